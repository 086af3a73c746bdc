//! The RouterOS CLI as the `rds` backend speaks it over SSH: the exact `/disk` and
//! `/file` commands (every value checked, then quoted), a parser for `print detail`
//! output that survives RouterOS's line wrapping, and the classes of errors that decide
//! whether a command is worth retrying. Pure: no I/O here.

use std::collections::BTreeMap;

/// Prefix of the subsystem NQNs RouterOS exports (the Go driver's, kept for adoption).
pub const NQN_PREFIX: &str = "nqn.2000-02.com.mikrotik:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosError {
    #[error(
        "{what} {value:?} cannot be sent to RouterOS: only letters, digits and ._-/ are allowed"
    )]
    Unsafe { what: &'static str, value: String },
    #[error("RouterOS: not enough space: {0}")]
    NoSpace(String),
    #[error("RouterOS rejected the command: {0}")]
    Invalid(String),
    #[error("RouterOS: no such item: {0}")]
    NotFound(String),
    #[error("RouterOS: {0}")]
    Other(String),
}

impl RosError {
    /// Worth another attempt: only what may pass by itself (a busy router, a dropped
    /// session) — never space, syntax, or missing items.
    pub fn retryable(&self) -> bool {
        matches!(self, RosError::Other(_))
    }
}

/// A disk slot (`pvc-<uuid>` for volumes made by the Go driver, our volume ids too).
fn checked<'a>(what: &'static str, value: &'a str) -> Result<&'a str, RosError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.contains("..")
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'));
    if ok {
        Ok(value)
    } else {
        Err(RosError::Unsafe {
            what,
            value: value.chars().take(64).collect(),
        })
    }
}

/// Double-quoted for RouterOS. Values are checked first, so nothing needs escaping; the
/// quotes keep RouterOS from reading anything as a script expression.
fn q(what: &'static str, value: &str) -> Result<String, RosError> {
    Ok(format!("\"{}\"", checked(what, value)?))
}

/// What a volume is on RouterOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec<'a> {
    pub slot: &'a str,
    /// Directory of the image files on the router, e.g. `/volumes`.
    pub dir: &'a str,
    pub size: u64,
    pub nvme_port: u16,
    /// The driver's record of the volume (empty: none), kept in the disk's comment.
    pub comment: &'a str,
}

impl DiskSpec<'_> {
    pub fn file_path(&self) -> String {
        format!("{}/{}.img", self.dir.trim_end_matches('/'), self.slot)
    }

    pub fn nqn(&self) -> String {
        format!("{NQN_PREFIX}{}", self.slot)
    }

    fn export_args(&self) -> Result<String, RosError> {
        Ok(format!(
            "slot={} nvme-tcp-export=yes nvme-tcp-server-port={} nvme-tcp-server-nqn={}{}",
            q("slot", self.slot)?,
            self.nvme_port,
            q("nqn", &self.nqn())?,
            comment_arg(self.comment)?
        ))
    }

    /// A disk holding a copy of `source_path`, not exported (a snapshot).
    pub fn snapshot_of(&self, source_path: &str) -> Result<String, RosError> {
        Ok(format!(
            "/disk add type=file file-path={} copy-from={} slot={}{}",
            q("file path", &self.file_path())?,
            q("source path", source_path)?,
            q("slot", self.slot)?,
            comment_arg(self.comment)?
        ))
    }

    /// `/disk add type=file …`: an empty sparse image, exported over NVMe/TCP.
    pub fn create(&self) -> Result<String, RosError> {
        Ok(format!(
            "/disk add type=file file-path={} file-size={} {}",
            q("file path", &self.file_path())?,
            self.size,
            self.export_args()?
        ))
    }

    /// A new disk holding a copy of `source` (snapshot or restore).
    pub fn copy_from(&self, source_path: &str) -> Result<String, RosError> {
        Ok(format!(
            "/disk add type=file file-path={} copy-from={} {}",
            q("file path", &self.file_path())?,
            q("source path", source_path)?,
            self.export_args()?
        ))
    }
}

/// Comments carry the driver's record (hex), so they are longer than names may be.
fn comment_arg(comment: &str) -> Result<String, RosError> {
    let safe = comment.len() <= 4096
        && comment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_' | b'.'));
    if comment.is_empty() {
        Ok(String::new())
    } else if safe {
        Ok(format!(" comment=\"{comment}\""))
    } else {
        Err(RosError::Unsafe {
            what: "comment",
            value: comment.chars().take(64).collect(),
        })
    }
}

/// `/disk set … file-size=`: grow only (the caller refuses shrinking); the comment
/// carries the new size too.
pub fn resize(slot: &str, size: u64, comment: &str) -> Result<String, RosError> {
    Ok(format!(
        "/disk set [find slot={}] file-size={size}{}",
        q("slot", slot)?,
        comment_arg(comment)?
    ))
}

/// Every disk, for listing and lookups by name.
pub const LIST: &str = "/disk print detail";
/// A cheap command that answers when the router is up and the login works.
pub const PROBE: &str = "/system resource print";

/// RouterOS prints sizes rounded with binary units (`10.0GiB`); plain digits are bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    Some((value * scale as f64).round() as u64)
}

/// Removing a volume: the disk entry, then its file. Both are idempotent by `find`.
pub fn remove(slot: &str, file_path: &str) -> Result<[String; 2], RosError> {
    Ok([
        format!("/disk remove [find slot={}]", q("slot", slot)?),
        format!(
            "/file remove [find name={}]",
            q("file path", file_path.trim_start_matches('/'))?
        ),
    ])
}

pub fn show(slot: &str) -> Result<String, RosError> {
    Ok(format!(
        "/disk print detail where slot={}",
        q("slot", slot)?
    ))
}

/// Whether a line is printed data (a `print` legend, an item, a comment, a field), not a
/// reply of the command's own: error words inside data (a disk's comment saying
/// "error") say nothing about the command.
fn is_data(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("Flags:")
        || t.starts_with("Columns:")
        || t.starts_with(";;;")
        || t.chars().next().is_some_and(|c| c.is_ascii_digit())
        || t.split_whitespace()
            .next()
            .is_some_and(|w| w.contains('=') && !w.starts_with('='))
}

/// Classifies RouterOS's answer to a command: empty or informational output is success.
/// Only the command's own reply, its first line unless that is printed data, is read.
pub fn check_output(output: &str) -> Result<(), RosError> {
    let reply = output
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .filter(|l| !is_data(l))
        .unwrap_or_default();
    let text = reply;
    let lower = text.to_ascii_lowercase();
    let first = || text.to_owned();
    if lower.contains("not enough space") || lower.contains("no space") {
        Err(RosError::NoSpace(first()))
    } else if lower.contains("no such item") || lower.contains("not found") {
        Err(RosError::NotFound(first()))
    } else if lower.contains("syntax error")
        || lower.contains("expected end of command")
        || lower.contains("invalid value")
        || lower.contains("bad command name")
        || lower.contains("input does not match")
        || lower.contains("invalid parameter")
        // An add that landed on an earlier attempt whose answer was lost: the caller
        // looks the item up instead of adding it again.
        || lower.contains("already exists")
    {
        Err(RosError::Invalid(first()))
    } else if lower.starts_with("failure:") || lower.contains("error") {
        Err(RosError::Other(first()))
    } else {
        Ok(())
    }
}

/// Splits `key=value key="quoted value"` text; values may hold spaces inside quotes.
fn pairs(text: &str, into: &mut BTreeMap<String, String>) {
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim();
        let after = &rest[eq + 1..];
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(char::is_whitespace) {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        // A flag word before the first key ("BT type=…") is not a key.
        let key = key.rsplit(char::is_whitespace).next().unwrap_or(key);
        if !key.is_empty() {
            into.insert(key.to_owned(), value.to_owned());
        }
        rest = tail.trim_start();
    }
}

/// Parses `print detail` output: a `Flags:` legend, then one item per index number,
/// its `key=value` pairs wrapped over indented lines as the terminal width dictates.
/// An item's comment (`;;; text`, after its index or on a line of its own before it)
/// comes back under the key `comment`.
pub fn parse_detail(output: &str) -> Vec<BTreeMap<String, String>> {
    let mut items: Vec<String> = Vec::new();
    let mut comments: BTreeMap<usize, String> = BTreeMap::new();
    let mut pending_comment = None;
    let mut in_legend = false;
    for line in output.lines() {
        let t = line.trim();
        if t.starts_with("Flags:") {
            in_legend = true;
            continue;
        }
        if t.is_empty() {
            continue;
        }
        if let Some(c) = t.strip_prefix(";;;") {
            pending_comment = Some(c.trim().to_owned());
            continue;
        }
        let starts_item = t
            .split_whitespace()
            .next()
            .is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()));
        // The legend may wrap over several lines until the first item.
        if in_legend && !starts_item {
            continue;
        }
        in_legend = false;
        let (t, inline_comment) = match t.split_once(";;;") {
            Some((head, c)) if starts_item => (head.trim_end(), Some(c.trim().to_owned())),
            _ => (t, None),
        };
        if starts_item {
            if let Some(c) = inline_comment.or(pending_comment.take()) {
                comments.insert(items.len(), c);
            }
        }
        let starts_item = t
            .split_whitespace()
            .next()
            .is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()));
        match items.last_mut() {
            Some(current) if !starts_item => {
                current.push(' ');
                current.push_str(t);
            }
            _ => items.push(t.to_owned()),
        }
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut map = BTreeMap::new();
            // Drop the index (and flags, handled in `pairs`).
            let body = item.split_once(char::is_whitespace).map_or("", |(_, b)| b);
            pairs(body, &mut map);
            if let Some(c) = comments.get(&i) {
                map.insert("comment".to_owned(), c.clone());
            }
            map
        })
        .filter(|map| !map.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DiskSpec<'static> {
        DiskSpec {
            slot: "pvc-3c6f1a2b-1111-4222-8333-944455556666",
            dir: "/volumes/",
            size: 10 << 30,
            nvme_port: 4420,
            comment: "",
        }
    }

    #[test]
    fn commands_are_exact() {
        let s = spec();
        assert_eq!(
            s.create().unwrap(),
            "/disk add type=file file-path=\"/volumes/pvc-3c6f1a2b-1111-4222-8333-944455556666.img\" file-size=10737418240 slot=\"pvc-3c6f1a2b-1111-4222-8333-944455556666\" nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-3c6f1a2b-1111-4222-8333-944455556666\""
        );
        assert_eq!(
            resize(s.slot, 20 << 30, "").unwrap(),
            "/disk set [find slot=\"pvc-3c6f1a2b-1111-4222-8333-944455556666\"] file-size=21474836480"
        );
        assert_eq!(
            remove(s.slot, &s.file_path()).unwrap(),
            [
                "/disk remove [find slot=\"pvc-3c6f1a2b-1111-4222-8333-944455556666\"]".to_owned(),
                "/file remove [find name=\"volumes/pvc-3c6f1a2b-1111-4222-8333-944455556666.img\"]"
                    .to_owned()
            ]
        );
        assert!(s
            .copy_from("/volumes/pvc-src.img")
            .unwrap()
            .contains("copy-from=\"/volumes/pvc-src.img\""));
        assert_eq!(
            show(s.slot).unwrap(),
            "/disk print detail where slot=\"pvc-3c6f1a2b-1111-4222-8333-944455556666\""
        );
    }

    #[test]
    fn nothing_unsafe_reaches_the_router() {
        for bad in [
            "x\"; /system reset-configuration",
            "a b",
            "$(reboot)",
            "[find]",
            "../../flash",
            "x\ny",
            "",
        ] {
            assert!(
                matches!(resize(bad, 1, ""), Err(RosError::Unsafe { .. })),
                "{bad:?}"
            );
        }
        let s = DiskSpec {
            dir: "/volumes;/system",
            ..spec()
        };
        assert!(s.create().is_err());
    }

    #[test]
    fn wrapped_detail_output_parses() {
        let out = "Flags: X - disabled, E - empty, B - block-device, T - nvme-tcp-export\n \
 0 B    type=hardware slot=\"sata1\" model=\"WDC WD20EFRX\" size=2000398934016\n\
 1  T   type=file slot=\"pvc-3c6f1a2b-1111-4222-8333-944455556666\"\n\
        file-path=/volumes/pvc-3c6f1a2b-1111-4222-8333-944455556666.img\n\
        file-size=10.0GiB nvme-tcp-export=yes nvme-tcp-server-port=4420\n\
        nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:pvc-3c6f1a2b-1111-4222-8333-944455556666\"\n";
        let items = parse_detail(out);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["model"], "WDC WD20EFRX");
        assert_eq!(items[0]["type"], "hardware");
        let v = &items[1];
        assert_eq!(v["slot"], "pvc-3c6f1a2b-1111-4222-8333-944455556666");
        assert_eq!(v["nvme-tcp-server-port"], "4420");
        assert_eq!(
            v["nvme-tcp-server-nqn"],
            "nqn.2000-02.com.mikrotik:pvc-3c6f1a2b-1111-4222-8333-944455556666"
        );
        assert_eq!(v["file-size"], "10.0GiB");
        assert!(parse_detail("Flags: X - disabled\n").is_empty());
    }

    #[test]
    fn comments_legends_and_sizes() {
        let out = "Flags: B - BLOCK-DEVICE; M - MOUNTED; F - FORMATTING;\n  T - NVME-TCP-EXPORT\n\
 0 BM   slot=\"nvme1\" type=\"hardware\" size=1000.2GiB free=512.0GiB\n\
 1 B  T ;;; handoff1:7b7d\n\
        slot=\"vol-1\" type=\"file\" file-size=1.0GiB\n\
   ;;; second form\n\
 2 B  T slot=\"vol-2\" type=\"file\"\n";
        let items = parse_detail(out);
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(!items[0].contains_key("comment"));
        assert_eq!(items[0]["free"], "512.0GiB");
        assert_eq!(items[1]["comment"], "handoff1:7b7d");
        assert_eq!(items[1]["slot"], "vol-1");
        assert_eq!(items[2]["comment"], "second form");
        assert_eq!(parse_size("10.0GiB"), Some(10 << 30));
        assert_eq!(parse_size("512.5MiB"), Some(512 * MIB + MIB / 2));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5TiB"), Some(3 << 39));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("3PB"), None);
        let s = DiskSpec {
            comment: "handoff1:00ff",
            ..spec()
        };
        assert!(s.create().unwrap().ends_with(" comment=\"handoff1:00ff\""));
        assert_eq!(
            s.snapshot_of("/volumes/pvc-src.img").unwrap(),
            "/disk add type=file file-path=\"/volumes/pvc-3c6f1a2b-1111-4222-8333-944455556666.img\" copy-from=\"/volumes/pvc-src.img\" slot=\"pvc-3c6f1a2b-1111-4222-8333-944455556666\" comment=\"handoff1:00ff\""
        );
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn errors_are_classified_for_retries() {
        assert_eq!(check_output(""), Ok(()));
        // Issue 15 case 17: error words in another disk's comment are data, not a reply.
        let listing = "Flags: X - disabled, B - block-device\n 0 B ;;; import error not found last week\n     slot=\"pvc-a\" type=file\n 1   slot=\"x\" comment=\"error\"\n";
        assert_eq!(check_output(listing), Ok(()));
        assert_eq!(check_output("  \n"), Ok(()));
        let space = check_output("failure: not enough space on disk").unwrap_err();
        assert!(matches!(space, RosError::NoSpace(_)) && !space.retryable());
        let syntax = check_output("expected end of command (line 1 column 12)").unwrap_err();
        assert!(matches!(syntax, RosError::Invalid(_)) && !syntax.retryable());
        let missing = check_output("no such item").unwrap_err();
        assert!(matches!(missing, RosError::NotFound(_)) && !missing.retryable());
        let busy = check_output("failure: could not lock, try again later").unwrap_err();
        assert!(busy.retryable());
        let in_use = check_output("failure: disk is in use").unwrap_err();
        assert!(in_use.retryable(), "a node still connected may let go");
        let exists = check_output("failure: file already exists").unwrap_err();
        assert!(!exists.retryable());
        let param = check_output("failure: invalid parameter").unwrap_err();
        assert!(!param.retryable());
    }
}
