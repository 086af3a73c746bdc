//! Parser for /proc/self/mountinfo: which mount, if any, sits on a path.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device numbers of the mounted filesystem (for a loop-backed ext4: the loop device).
    pub major: u32,
    pub minor: u32,
    /// Path inside that filesystem which is mounted here ("/" for a whole filesystem).
    pub root: String,
    pub mount_point: PathBuf,
    pub read_only: bool,
    /// The filesystem itself is read-only (superblock options), e.g. after ext4's
    /// errors=remount-ro fired, even where the mount was made read-write.
    pub fs_read_only: bool,
    pub fs_type: String,
    pub source: String,
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (pre, post) = line.split_once(" - ")?;
    let mut pre = pre.split(' ');
    let _id = pre.next()?;
    let _parent = pre.next()?;
    let (major, minor) = pre.next()?.split_once(':')?;
    let root = unescape(pre.next()?);
    let mount_point = PathBuf::from(unescape(pre.next()?));
    let options = pre.next()?;
    let mut post = post.split(' ');
    let fs_type = post.next()?.to_owned();
    let source = unescape(post.next()?);
    let super_options = post.next().unwrap_or("");
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        read_only: options.split(',').any(|o| o == "ro"),
        // Newer kernels report an error-triggered read-only ext4 as "emergency_ro".
        fs_read_only: super_options
            .split(',')
            .any(|o| o == "ro" || o == "emergency_ro"),
        fs_type,
        source,
    })
}

/// The topmost mount on exactly `path` (later lines stack over earlier ones).
pub fn find_mount(mountinfo: &str, path: &Path) -> Option<MountEntry> {
    mountinfo
        .lines()
        .rev()
        .filter_map(parse_line)
        .find(|m| m.mount_point == path)
}

/// Every mount of the filesystem or device with these numbers.
pub fn mounts_of(mountinfo: &str, major: u32, minor: u32) -> Vec<MountEntry> {
    mountinfo
        .lines()
        .filter_map(parse_line)
        .filter(|m| m.major == major && m.minor == minor)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=100k
41 22 7:3 / /var/lib/kubelet/staging/pv\\0401 rw,relatime shared:9 - ext4 /dev/loop3 rw
42 22 7:3 / /var/lib/kubelet/pods/p/mount ro,relatime shared:9 - ext4 /dev/loop3 rw
43 22 0:5 /loop4 /var/lib/kubelet/pods/p/dev/vol rw,nosuid shared:2 - devtmpfs devtmpfs rw
44 22 7:3 / /var/lib/kubelet/pods/p/mount rw,relatime shared:9 - ext4 /dev/loop3 rw
";

    #[test]
    fn finds_escaped_paths_and_the_topmost_mount() {
        let m = find_mount(SAMPLE, Path::new("/var/lib/kubelet/staging/pv 1")).unwrap();
        assert_eq!((m.major, m.minor), (7, 3));
        assert_eq!(m.fs_type, "ext4");
        let top = find_mount(SAMPLE, Path::new("/var/lib/kubelet/pods/p/mount")).unwrap();
        assert!(!top.read_only, "the later, read-write mount is on top");
        assert!(find_mount(SAMPLE, Path::new("/var/lib/kubelet")).is_none());
    }

    #[test]
    fn device_bind_mounts_show_the_device_as_root() {
        let m = find_mount(SAMPLE, Path::new("/var/lib/kubelet/pods/p/dev/vol")).unwrap();
        assert_eq!(m.root, "/loop4");
        assert_eq!(m.fs_type, "devtmpfs");
    }

    #[test]
    fn mounts_of_lists_every_use_of_a_filesystem() {
        assert_eq!(mounts_of(SAMPLE, 7, 3).len(), 3);
        assert!(mounts_of(SAMPLE, 7, 9).is_empty());
    }

    #[test]
    fn a_filesystem_remounted_read_only_after_errors_is_visible() {
        let line = "50 22 7:5 / /stage rw,relatime shared:9 - ext4 /dev/loop5 ro,errors=remount-ro";
        let m = find_mount(line, Path::new("/stage")).unwrap();
        assert!(!m.read_only);
        assert!(m.fs_read_only);
        assert!(
            !find_mount(SAMPLE, Path::new("/var/lib/kubelet/pods/p/mount"))
                .unwrap()
                .fs_read_only
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(find_mount("nonsense\n\n1 2 x / / rw - ext4", Path::new("/")).is_none());
    }
}
