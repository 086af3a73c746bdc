//! A fake MikroTik RouterOS reached over real SSH (a russh server): it keeps `/disk`
//! entries and files, answers the driver's commands the way a real router prints them
//! — as captured on hardware in the Go driver's tests (3whiskeywhiskey/rds-csi,
//! pkg/rds/commands_test.go) and MikroTik's `/disk` reference: a flags legend; `;;;`
//! comments wrapped over lines; properties wrapped at 80 columns, long unquoted values
//! (file paths) cut mid-value; raw byte counts in groups of three (`size=53 687 091 200`)
//! next to rounded ones (`file-size=50.0GiB`); the pool as a mounted partition queried by
//! `mount-point=`; copies made from an item (`copy-from=[find slot=…]`); an export's
//! `nvme-tcp-server-allow-host-name`. Errors are RouterOS's texts (`failure: …`,
//! `no such item`, `expected end of command (line 1 column N)`, `invalid internal item
//! number`) and exit with status 1. It records every command, and can be told to fail
//! the next commands or to be slow.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId};

pub const PASSWORD: &str = "router-secret";
pub const USER: &str = "csi";

#[derive(Debug, Default)]
pub struct RouterState {
    /// Disk entries in print order, each the properties RouterOS would show.
    pub disks: Vec<BTreeMap<String, String>>,
    /// File name (no leading '/') → size in bytes.
    pub files: BTreeMap<String, u64>,
    /// Every command received, in order.
    pub commands: Vec<String>,
    /// Outputs to answer the next commands with instead of running them.
    pub inject: VecDeque<String>,
    pub free: u64,
    in_flight: usize,
    /// Most commands that ever ran at the same time (sessions must be serialised).
    pub max_in_flight: usize,
    /// How long each command takes.
    pub delay: Duration,
    pub logins: usize,
    /// The next this many commands print nothing and exit with status 1.
    pub silent_failures: usize,
    /// Unreachable: sessions break, new connections are closed at once.
    pub down: bool,
    /// The next this many commands run, print half their output and close the channel
    /// without an exit status (a session cut mid-command).
    pub cut_without_status: usize,
    /// Slot → how often its export was turned off and on again (connections dropped).
    pub export_cycles: BTreeMap<String, usize>,
}

pub struct FakeRouter {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<RouterState>>,
    pub host_key: PublicKey,
    /// The client's private key (OpenSSH format) in a file, and its public half.
    pub client_key_file: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

impl FakeRouter {
    /// A router with disk `nvme1` (the pool, `free` bytes free) and nothing else.
    pub async fn start(free: u64) -> FakeRouter {
        Self::start_with_key(free, 7).await
    }

    /// `host_seed` picks the host key: a different seed is a different host.
    pub async fn start_with_key(free: u64, host_seed: u8) -> FakeRouter {
        let dir = tempfile::tempdir().unwrap();
        let client = key(42);
        let client_key_file = dir.path().join("id_ed25519");
        std::fs::write(
            &client_key_file,
            client.to_openssh(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        let host = key(host_seed);
        let host_key = host.public_key().clone();
        let state = Arc::new(Mutex::new(RouterState {
            free,
            ..Default::default()
        }));
        state.lock().disks.push(
            [
                ("slot", "\"nvme1\""),
                ("type", "\"partition\""),
                ("mount-point", "\"nvme1\""),
                ("model", "\"Samsung SSD 990 PRO 2TB\""),
                ("size", "1 999 844 147 200"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        let config = Arc::new(server::Config {
            keys: vec![host],
            auth_rejection_time: Duration::from_millis(1),
            auth_rejection_time_initial: Some(Duration::ZERO),
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (st, client_pub) = (state.clone(), client.public_key().clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if st.lock().down {
                    continue; // dropped: the connection closes
                }
                let _ = stream.set_nodelay(true);
                let handler = Handler {
                    state: st.clone(),
                    client_key: client_pub.clone(),
                };
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(session) = server::run_stream(config, stream, handler).await {
                        let _ = session.await;
                    }
                });
            }
        });
        FakeRouter {
            addr,
            state,
            host_key,
            client_key_file,
            _dir: dir,
            task,
        }
    }

    pub fn host_key_line(&self) -> String {
        self.host_key.to_openssh().unwrap()
    }

    pub fn host_fingerprint(&self) -> String {
        self.host_key.fingerprint(HashAlg::Sha256).to_string()
    }

    pub fn commands(&self) -> Vec<String> {
        self.state.lock().commands.clone()
    }

    pub fn take_commands(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().commands)
    }

    /// What `/disk print detail` prints now.
    pub fn print_detail(&self) -> String {
        print(&self.state.lock(), None)
    }

    pub fn inject(&self, output: &str) {
        self.state.lock().inject.push_back(output.to_owned());
    }

    pub fn disk(&self, slot: &str) -> Option<BTreeMap<String, String>> {
        let quoted = format!("\"{slot}\"");
        self.state
            .lock()
            .disks
            .iter()
            .find(|d| d.get("slot") == Some(&quoted))
            .cloned()
    }

    /// A snapshot as the Go driver made it: `snap-<uuid>-at-<unix time>`, not exported.
    pub fn add_go_driver_snapshot(&self, slot: &str, dir: &str, size: u64) {
        let path = format!("{}/{slot}.img", dir.trim_matches('/'));
        let mut s = self.state.lock();
        s.free -= size;
        s.files.insert(path.clone(), size);
        s.disks.push(
            [
                ("slot", format!("\"{slot}\"")),
                ("type", "file".into()),
                ("file-path", format!("/{path}")),
                ("size", spaced(size)),
                ("file-size", human(size)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        );
    }

    /// A disk as the Go driver made it: exported, no comment.
    pub fn add_go_driver_disk(&self, slot: &str, dir: &str, size: u64, port: u16) {
        let path = format!("{}/{slot}.img", dir.trim_matches('/'));
        let mut s = self.state.lock();
        s.free -= size;
        s.files.insert(path.clone(), size);
        s.disks.push(
            [
                ("slot", format!("\"{slot}\"")),
                ("type", "file".into()),
                ("file-path", format!("/{path}")),
                ("size", spaced(size)),
                ("file-size", human(size)),
                ("mount-filesystem", "yes".into()),
                ("nvme-tcp-server-allow-host-name", "\"\"".into()),
                ("nvme-tcp-export", "yes".into()),
                ("nvme-tcp-server-port", port.to_string()),
                (
                    "nvme-tcp-server-nqn",
                    format!("\"nqn.2000-02.com.mikrotik:{slot}\""),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        );
    }
}

struct Handler {
    state: Arc<Mutex<RouterState>>,
    client_key: PublicKey,
}

impl server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        if user == USER && key.key_data() == self.client_key.key_data() {
            self.state.lock().logins += 1;
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if user == USER && password == PASSWORD {
            self.state.lock().logins += 1;
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        if self.state.lock().down {
            return Err(russh::Error::Disconnect);
        }
        let delay = {
            let mut s = self.state.lock();
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
            s.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (output, status) = {
            let mut s = self.state.lock();
            s.in_flight -= 1;
            s.commands.push(command.clone());
            if s.cut_without_status > 0 {
                s.cut_without_status -= 1;
                let out = execute(&mut s, &command);
                let half = out.len() / 2;
                drop(s);
                session.channel_success(channel)?;
                session.data(channel, out.as_bytes()[..half].to_vec())?;
                session.eof(channel)?;
                session.close(channel)?;
                return Ok(());
            }
            if s.silent_failures > 0 {
                s.silent_failures -= 1;
                (String::new(), 1)
            } else {
                let out = match s.inject.pop_front() {
                    Some(canned) => canned,
                    None => execute(&mut s, &command),
                };
                // RouterOS's errors end the command with a non-zero exit.
                let status = u32::from(is_error(&out));
                (out, status)
            }
        };
        session.channel_success(channel)?;
        // RouterOS ends lines with CRLF.
        session.data(channel, output.replace('\n', "\r\n").into_bytes())?;
        session.exit_status_request(channel, status)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }
}

/// Splits a command into words, keeping "quoted values" and [find …] together.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut bracket) = (false, false);
    for c in command.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            '[' if !quoted => {
                bracket = true;
                cur.push(c);
            }
            ']' if !quoted => {
                bracket = false;
                cur.push(c);
            }
            ' ' if !quoted && !bracket => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn args(words: &[String]) -> Result<BTreeMap<String, String>, String> {
    words
        .iter()
        .map(|w| {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("expected end of command (line 1 column 1) {w}"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn unquote(v: &str) -> String {
    v.trim_matches('"').to_owned()
}

/// `[find slot="x"]` → ("slot", "x").
fn find(word: &str) -> Option<(String, String)> {
    let inner = word.strip_prefix("[find ")?.strip_suffix(']')?;
    let (k, v) = inner.split_once('=')?;
    Some((k.to_owned(), unquote(v)))
}

fn human(bytes: u64) -> String {
    let gib = 1u64 << 30;
    if bytes >= gib {
        format!("{:.1}GiB", bytes as f64 / gib as f64)
    } else {
        format!("{:.1}MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Bytes as RouterOS prints a raw count: digits in groups of three.
fn spaced(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// What RouterOS answers when a command fails (and exits non-zero). Where each text
/// comes from:
/// - `failure: not enough space`, `no such item`: the Go driver's retry rules
///   (pkg/rds/ssh_client.go `isRetryableError`), its idempotent delete
///   (pkg/rds/commands.go) and its mock router (test/mock/error_injection.go,
///   test/mock/rds_server.go, which also exits 1 with `failure: …`);
/// - `failure: could not lock`, `failure: … in use`: RouterOS's `failure:` form for a
///   busy item, as the driver classifies it (src/backend/routeros.rs);
/// - `expected end of command (line L column C)`, `syntax error`, `bad command name`,
///   `invalid value for argument`, `invalid internal item number`: the console's own
///   parse and lookup errors. These are written from the console's known messages, not
///   from a hardware capture: the driver only needs the first line to be the reply.
fn is_error(out: &str) -> bool {
    let first = out.lines().next().unwrap_or("");
    first.starts_with("failure:")
        || first.starts_with("no such item")
        || first.starts_with("expected end of command")
        || first.starts_with("syntax error")
        || first.starts_with("bad command name")
        || first.starts_with("invalid value")
        || first.starts_with("invalid internal item number")
}

fn slot_of(d: &BTreeMap<String, String>) -> String {
    d.get("slot").map(|s| unquote(s)).unwrap_or_default()
}

fn file_of(d: &BTreeMap<String, String>) -> String {
    d.get("file-path")
        .map(|p| unquote(p).trim_start_matches('/').to_owned())
        .unwrap_or_default()
}

fn execute(s: &mut RouterState, command: &str) -> String {
    let w = words(command);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["/system", "resource", "print"] => {
            "                   uptime: 3d2h\n                  version: 7.16 (stable)\n".into()
        }
        ["/disk", "print", "detail"] => print(s, None),
        ["/disk", "print", "detail", "where", cond] => match cond.split_once('=') {
            Some((key @ ("slot" | "mount-point"), v)) => print(s, Some((key, unquote(v)))),
            _ => "syntax error (line 1 column 25)".into(),
        },
        ["/disk", "add", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|x| x.to_string()).collect();
            match args(&rest) {
                Ok(a) => add(s, a),
                Err(e) => e,
            }
        }
        ["/disk", "set", sel, rest @ ..] => {
            let Some((_, slot)) = find(sel) else {
                return "expected end of command (line 1 column 11)".into();
            };
            let rest: Vec<String> = rest.iter().map(|x| x.to_string()).collect();
            let a = match args(&rest) {
                Ok(a) => a,
                Err(e) => return e,
            };
            set(s, &slot, &a)
        }
        ["/disk", "remove", sel] => {
            let Some((_, slot)) = find(sel) else {
                return "expected end of command (line 1 column 14)".into();
            };
            s.disks.retain(|d| slot_of(d) != slot);
            String::new()
        }
        ["/file", "remove", sel] => {
            let Some((_, name)) = find(sel) else {
                return "expected end of command (line 1 column 14)".into();
            };
            if let Some(size) = s.files.remove(&name) {
                s.free += size;
            }
            String::new()
        }
        _ => "bad command name (line 1 column 2)".into(),
    }
}

fn set(s: &mut RouterState, slot: &str, a: &BTreeMap<String, String>) -> String {
    let free = s.free;
    let Some(d) = s.disks.iter().find(|d| slot_of(d) == slot) else {
        return String::new(); // [find] matched nothing: nothing to set.
    };
    let path = file_of(d);
    let mut grow = 0;
    if let Some(size) = a.get("file-size") {
        let Ok(size) = size.parse::<u64>() else {
            return "invalid value for argument file-size".into();
        };
        let old = s.files.get(&path).copied().unwrap_or(0);
        grow = size.saturating_sub(old);
        if grow > free {
            return "failure: not enough space on disk".into();
        }
        s.files.insert(path, size);
        let d = s
            .disks
            .iter_mut()
            .find(|d| slot_of(d) == slot)
            .expect("found above");
        d.insert("file-size".into(), human(size));
        d.insert("size".into(), spaced(size));
    }
    s.free -= grow;
    if a.get("nvme-tcp-export").map(String::as_str) == Some("no") {
        *s.export_cycles.entry(slot.to_owned()).or_default() += 1;
    }
    let d = s
        .disks
        .iter_mut()
        .find(|d| slot_of(d) == slot)
        .expect("found above");
    for key in [
        "comment",
        "nvme-tcp-export",
        "nvme-tcp-server-allow-host-name",
        "mount-filesystem",
    ] {
        if let Some(v) = a.get(key) {
            let v = if key == "comment" {
                unquote(v)
            } else {
                v.clone()
            };
            d.insert(key.into(), v);
        }
    }
    String::new()
}

fn add(s: &mut RouterState, a: BTreeMap<String, String>) -> String {
    if a.get("type").map(String::as_str) != Some("file") {
        return "failure: only type=file is simulated".into();
    }
    let (Some(path), Some(slot)) = (a.get("file-path"), a.get("slot")) else {
        return "failure: file-path and slot are required".into();
    };
    let (path, slot) = (
        unquote(path).trim_start_matches('/').to_owned(),
        unquote(slot),
    );
    if s.disks.iter().any(|d| slot_of(d) == slot) {
        return "failure: slot with such name already exists".into();
    }
    let source = match a.get("copy-from") {
        None => None,
        // RouterOS takes the item to copy, not a path.
        Some(item) => match find(item) {
            Some((key, value)) if key == "slot" => {
                match s.disks.iter().find(|d| slot_of(d) == value) {
                    Some(d) => Some(s.files.get(&file_of(d)).copied().unwrap_or(0)),
                    None => return "no such item".into(),
                }
            }
            _ => return "invalid internal item number".into(),
        },
    };
    let size = match (a.get("file-size"), source) {
        (Some(size), source) => match size.parse::<u64>() {
            Ok(n) if source.is_none_or(|src| n >= src) => n,
            Ok(_) => return "failure: file-size is smaller than the copied disk".into(),
            Err(_) => return "invalid value for argument file-size".into(),
        },
        (None, Some(src)) => src,
        (None, None) => return "failure: give file-size or copy-from".into(),
    };
    if size > s.free {
        return "failure: not enough space on disk".into();
    }
    s.free -= size;
    s.files.insert(path.clone(), size);
    let mut d = BTreeMap::new();
    d.insert("slot".to_owned(), format!("\"{slot}\""));
    d.insert("type".into(), "file".into());
    // Printed unquoted, as a real router prints a path.
    d.insert("file-path".into(), format!("/{path}"));
    d.insert("size".into(), spaced(size));
    d.insert("file-size".into(), human(size));
    d.insert(
        "mount-filesystem".into(),
        a.get("mount-filesystem")
            .cloned()
            .unwrap_or_else(|| "yes".into()),
    );
    for key in [
        "nvme-tcp-export",
        "nvme-tcp-server-port",
        "nvme-tcp-server-nqn",
        "nvme-tcp-server-allow-host-name",
    ] {
        if let Some(v) = a.get(key) {
            d.insert(key.into(), v.clone());
        }
    }
    if d.contains_key("nvme-tcp-export") && !d.contains_key("nvme-tcp-server-allow-host-name") {
        d.insert("nvme-tcp-server-allow-host-name".into(), "\"\"".into());
    }
    if let Some(c) = a.get("comment") {
        d.insert("comment".into(), unquote(c));
    }
    s.disks.push(d);
    String::new()
}

const WIDTH: usize = 80;

/// Appends `text` to the item being printed, wrapping at 80 columns under an 8-space
/// indent; a word longer than the room left is cut where the line ends.
fn wrap_into(out: &mut String, line: &mut String, word: &str) {
    let mut word = word;
    loop {
        let sep = usize::from(!line.ends_with(' ') && !line.trim().is_empty());
        if line.len() + sep + word.len() <= WIDTH {
            if sep == 1 {
                line.push(' ');
            }
            line.push_str(word);
            return;
        }
        let room = WIDTH.saturating_sub(line.len() + sep);
        // A property moves to the next line whole when it fits there; only a value
        // longer than a line is cut where the line ends.
        if line.trim().len() > 3 && (word.len() <= WIDTH - 8 || room < 8) {
            out.push_str(line.trim_end());
            out.push('\n');
            *line = " ".repeat(8);
            continue;
        }
        let cut = room.min(word.len());
        if sep == 1 {
            line.push(' ');
        }
        line.push_str(&word[..cut]);
        out.push_str(line.trim_end());
        out.push('\n');
        *line = " ".repeat(8);
        word = &word[cut..];
        if word.is_empty() {
            return;
        }
    }
}

/// `print detail` as a real router prints it: legend, index and flags, `;;; comment`
/// after the index (wrapped), then the properties.
fn print(s: &RouterState, filter: Option<(&str, String)>) -> String {
    let mut out = String::from(
        "Flags: X - DISABLED; E - EMPTY; B - BLOCK-DEVICE; M - MOUNTED;\n  T - NVME-TCP-EXPORT\n",
    );
    for (i, d) in s.disks.iter().enumerate() {
        if let Some((key, want)) = &filter {
            if d.get(*key).map(|v| unquote(v)).as_deref() != Some(want.as_str()) {
                continue;
            }
        }
        let mounted = d.contains_key("mount-point");
        let exported = d.get("nvme-tcp-export").map(String::as_str) == Some("yes");
        let flags = format!(
            "{}{}",
            if mounted { "BM" } else { "B " },
            if exported { "T" } else { " " }
        );
        let mut line = format!("{i:>2} {flags} ");
        if let Some(c) = d.get("comment") {
            line.push_str(";;; ");
            wrap_into(&mut out, &mut line, c);
            out.push_str(line.trim_end());
            out.push('\n');
            line = " ".repeat(8);
        }
        let mut props: Vec<String> = d
            .iter()
            .filter(|(k, _)| k.as_str() != "comment")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if mounted {
            props.push(format!("free={}", spaced(s.free)));
        }
        for p in props {
            // A grouped number wraps only between properties.
            if p.starts_with("size=") || p.starts_with("free=") {
                if line.len() + p.len() + 1 > WIDTH {
                    out.push_str(line.trim_end());
                    out.push('\n');
                    line = " ".repeat(8);
                }
                if !line.ends_with(' ') {
                    line.push(' ');
                }
                line.push_str(&p);
            } else {
                wrap_into(&mut out, &mut line, &p);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
