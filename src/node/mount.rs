//! Filesystem work on the node: probe, format, mount, bind, unmount, stats. Mount and
//! unmount are syscalls; only mkfs and blkid are external tools (through CommandRunner).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use nix::mount::{MntFlags, MsFlags};

use super::command::{CommandRunner, ToolError};
use super::mountinfo::{self, MountEntry};
use crate::capability::FsType;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{op} {path:?}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path:?}: {reason}; nothing outside the kubelet directory was touched")]
    OutsideRoot {
        op: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{what} needs {capability}, which this node plugin does not have; run it privileged")]
    MissingCapability {
        what: &'static str,
        capability: &'static str,
    },
    /// blkid found no signature, but the device could not be read: "empty" is not known,
    /// so nothing is formatted (a network path may come back with the data intact).
    #[error("device {device:?} could not be read ({source}); not formatting it — an unreadable volume is not an empty one")]
    Unreadable {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the first and last 64 KiB of `device` with O_DIRECT (bypassing any cache).
fn confirm_readable(device: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const SPAN: usize = 64 * 1024;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?;
    let size = block_device_size(device)?;
    let mut buf = crate::datacheck::AlignedBuf::new(SPAN);
    let span = SPAN as u64;
    for offset in [0, size.saturating_sub(span) / 4096 * 4096] {
        let want = span.min(size - offset) as usize;
        if want > 0 {
            f.read_exact_at(&mut buf.as_mut_slice()[..want], offset)?;
        }
    }
    Ok(())
}

/// Whether this process holds capability `bit` (see capabilities(7)), from /proc.
pub fn has_capability(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps >> bit & 1 == 1)
}

/// CAP_SYS_RESOURCE: ext4 online resize (EXT4_IOC_RESIZE_FS) requires it.
pub const CAP_SYS_RESOURCE: u32 = 24;

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Sys {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn errno(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// What blkid found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    Filesystem(String),
    /// A partition table or another non-filesystem signature: never format over it.
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStats {
    Block {
        total_bytes: u64,
    },
    Filesystem {
        total_bytes: u64,
        available_bytes: u64,
        used_bytes: u64,
        total_inodes: u64,
        available_inodes: u64,
        used_inodes: u64,
    },
}

/// Mount flags from a CSI capability, split into kernel flags and filesystem data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

impl MountOptions {
    pub fn parse(csi_flags: &[String], read_only: bool) -> Self {
        let mut opts = MountOptions {
            flags: MsFlags::empty(),
            data: Vec::new(),
        };
        for f in csi_flags {
            let flag = match f.as_str() {
                "ro" => MsFlags::MS_RDONLY,
                "rw" | "defaults" => MsFlags::empty(),
                "noatime" => MsFlags::MS_NOATIME,
                "nodiratime" => MsFlags::MS_NODIRATIME,
                "relatime" => MsFlags::MS_RELATIME,
                "strictatime" => MsFlags::MS_STRICTATIME,
                "lazytime" => MsFlags::MS_LAZYTIME,
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "sync" => MsFlags::MS_SYNCHRONOUS,
                "dirsync" => MsFlags::MS_DIRSYNC,
                other => {
                    opts.data.push(other.to_owned());
                    continue;
                }
            };
            opts.flags |= flag;
        }
        if read_only {
            opts.flags |= MsFlags::MS_RDONLY;
        }
        opts
    }
}

/// Creates the file a device is bound over. create_new: an existing target (perhaps a
/// device bound over it) is kept, not opened.
fn create_new_file(p: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a directory or file (a symlink itself); absent is fine.
fn remove_entry(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The root, parent and name of `path` when it lies under the confining root.
fn confined_entry(
    root: Option<PathBuf>,
    path: &Path,
) -> Option<(PathBuf, &Path, &std::ffi::OsStr)> {
    Some((
        root.filter(|r| path.starts_with(r))?,
        path.parent()?,
        path.file_name()?,
    ))
}

/// Runs a filesystem call on the blocking pool, naming the operation and path on error.
async fn fs_call<T: Send + 'static>(
    op: &'static str,
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
) -> Result<T, MountError> {
    let path = path.to_path_buf();
    crate::blocking::run_blocking(move || {
        f(&path).map_err(|source| MountError::Sys { op, path, source })
    })
    .await
}

#[async_trait]
pub trait Mounter: Send + Sync + 'static {
    /// The directory a filesystem is mounted on (with its parents); existing is fine.
    async fn make_dir(&self, path: &Path) -> Result<(), MountError> {
        fs_call("create directory", path, |p| std::fs::create_dir_all(p)).await
    }
    /// The file a block device is bound over; an existing one is kept.
    async fn make_file(&self, path: &Path) -> Result<(), MountError> {
        fs_call("create file", path, create_new_file).await
    }
    /// The (major, minor) of the block device node at `path`, if it is one.
    async fn block_device_at(&self, path: &Path) -> Result<Option<(u32, u32)>, MountError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        fs_call("stat", path, |p| {
            let meta = std::fs::metadata(p)?;
            Ok(meta
                .file_type()
                .is_block_device()
                .then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev()))))
        })
        .await
    }
    /// Removes a mount point left after unmounting (directory or file); absent is fine.
    async fn remove_mount_point(&self, path: &Path) -> Result<(), MountError> {
        fs_call("remove", path, remove_entry).await
    }
    async fn probe(&self, device: &Path) -> Result<Option<Signature>, MountError>;
    async fn format(&self, device: &Path, fs: FsType) -> Result<(), MountError>;
    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs: FsType,
        opts: &MountOptions,
    ) -> Result<(), MountError>;
    /// Bind-mounts `source` (a directory or a device node) onto `target`.
    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError>;
    /// Unmounts everything stacked on `target`; an unmounted or missing path is success.
    async fn unmount(&self, target: &Path) -> Result<(), MountError>;
    async fn mount_at(&self, target: &Path) -> Result<Option<MountEntry>, MountError>;
    /// Every mount of the filesystem or device with these numbers.
    async fn mounts_of(&self, major: u32, minor: u32) -> Result<Vec<MountEntry>, MountError>;
    async fn stats(&self, path: &Path) -> Result<VolumeStats, MountError>;
    /// Grows a mounted filesystem to fill its (already grown) device, online.
    async fn grow(&self, device: &Path, mount_point: &Path, fs: FsType) -> Result<(), MountError>;
}

/// The real thing: syscalls plus mkfs/blkid.
#[derive(Debug, Clone)]
pub struct SysMounter {
    runner: CommandRunner,
    mountinfo: PathBuf,
    /// Mount targets and bind sources under this directory (the kubelet's) are opened
    /// beneath it and mounted through their descriptor.
    beneath: Option<PathBuf>,
}

impl SysMounter {
    pub fn new(runner: CommandRunner) -> Self {
        SysMounter {
            runner,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            beneath: None,
        }
    }

    /// The request's paths were checked against `root` before the call, but a component
    /// swapped for a symlink afterwards would move the mount elsewhere. Confined, every
    /// path under `root` is opened beneath it (openat2 RESOLVE_BENEATH) and the mount
    /// goes onto that descriptor, so what was checked is what is mounted.
    pub fn confined_to(mut self, root: &Path) -> Self {
        self.beneath = Some(std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()));
        self
    }

    fn read_mountinfo(&self) -> Result<String, MountError> {
        std::fs::read_to_string(&self.mountinfo).map_err(sys("read", &self.mountinfo))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MountError> + Send + 'static,
) -> Result<T, MountError> {
    crate::blocking::run_blocking(f).await
}

/// A path held for a mount call: under the confining root, the `/proc/self/fd/N` of an
/// O_PATH descriptor opened beneath it (the kernel mounts on exactly that inode);
/// elsewhere (device nodes, the data dir) the path itself.
struct Pinned {
    _fd: Option<std::os::fd::OwnedFd>,
    path: PathBuf,
}

fn pin(root: Option<&Path>, op: &'static str, path: &Path) -> Result<Pinned, MountError> {
    let Some(rel) = root.and_then(|r| path.strip_prefix(r).ok()) else {
        return Ok(Pinned {
            _fd: None,
            path: path.to_path_buf(),
        });
    };
    let root = root.expect("rel implies root");
    let fd = open_beneath(root, rel).map_err(|e| match e {
        Beneath::Outside(reason) => MountError::OutsideRoot {
            op,
            path: path.to_path_buf(),
            reason,
        },
        Beneath::Io(source) => MountError::Sys {
            op,
            path: path.to_path_buf(),
            source,
        },
    })?;
    Ok(Pinned {
        path: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        _fd: Some(fd),
    })
}

enum Beneath {
    Outside(String),
    Io(std::io::Error),
}

/// Opens `rel` beneath `root` as O_PATH, never leaving `root`: openat2 with
/// RESOLVE_BENEATH (symlinks that stay inside still work); on a kernel without openat2
/// (before 5.6) a walk that opens each component without following symlinks.
fn open_beneath(root: &Path, rel: &Path) -> Result<std::os::fd::OwnedFd, Beneath> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::Mode;
    let io = |e: nix::errno::Errno| Beneath::Io(errno(e));
    let dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    if rel.as_os_str().is_empty() {
        return Ok(dir);
    }
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match nix::fcntl::openat2(&dir, rel, how) {
        Ok(fd) => Ok(fd),
        Err(nix::errno::Errno::EXDEV) | Err(nix::errno::Errno::ELOOP) => {
            Err(Beneath::Outside(format!(
                "resolves outside {} (a symlink changed since the request was checked?)",
                root.display()
            )))
        }
        // No openat2 (old kernel, or a seccomp profile that refuses it).
        Err(nix::errno::Errno::ENOSYS) | Err(nix::errno::Errno::EPERM) => walk_beneath(dir, rel),
        Err(e) => Err(io(e)),
    }
}

fn walk_beneath(mut at: std::os::fd::OwnedFd, rel: &Path) -> Result<std::os::fd::OwnedFd, Beneath> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::{Mode, SFlag};
    for part in rel.components() {
        let std::path::Component::Normal(name) = part else {
            return Err(Beneath::Outside(format!("{part:?} is not a plain name")));
        };
        let next = nix::fcntl::openat(
            &at,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Beneath::Io(errno(e)))?;
        let st = nix::sys::stat::fstat(&next).map_err(|e| Beneath::Io(errno(e)))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            return Err(Beneath::Outside(format!(
                "{name:?} is a symlink (without openat2 no symlink is followed below the kubelet directory)"
            )));
        }
        at = next;
    }
    Ok(at)
}

/// Remounts the bind just made on `target` read-only, reaching it as the pinned parent's
/// entry (mounts are crossed there; a symlink is not followed), and proves it: the entry
/// is the bind's root (the source's inode) and its mount is read-only. Fails otherwise.
fn remount_read_only_beneath(
    root: Option<&Path>,
    source: &Pinned,
    target: &Path,
) -> Result<(), MountError> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::{Mode, SFlag};
    let outside = |reason: String| MountError::OutsideRoot {
        op: "remount read-only",
        path: target.to_path_buf(),
        reason,
    };
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(outside("has no parent directory".into()));
    };
    let parent = pin(root, "remount read-only", parent)?;
    let entry = PathBuf::from(&parent.path).join(name);
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    nix::mount::mount(None::<&str>, &entry, None::<&str>, flags, None::<&str>)
        .map_err(|e| sys("remount read-only", target)(errno(e)))?;
    let parent_fd = parent._fd.as_ref().expect("confined paths are pinned");
    let now = nix::fcntl::openat(
        parent_fd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys("remount read-only", target)(errno(e)))?;
    let st = nix::sys::stat::fstat(&now).map_err(|e| sys("stat", target)(errno(e)))?;
    let src = source
        ._fd
        .as_ref()
        .map(nix::sys::stat::fstat)
        .unwrap_or_else(|| nix::sys::stat::stat(&source.path))
        .map_err(|e| sys("stat", &source.path)(errno(e)))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
        || (st.st_dev, st.st_ino) != (src.st_dev, src.st_ino)
    {
        return Err(outside(
            "is no longer the bind mount just made (the path changed during the call)".into(),
        ));
    }
    let vfs = nix::sys::statvfs::fstatvfs(&now).map_err(|e| sys("statvfs", target)(errno(e)))?;
    if !vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(outside(
            "is still writable after the read-only remount".into(),
        ));
    }
    Ok(())
}

/// mountinfo lists resolved paths; resolve ours the same way (a missing path stays as is).
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Size in bytes of the block device at `path`.
pub fn block_device_size(path: &Path) -> std::io::Result<u64> {
    let f = File::open(path)?;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which outlives the call.
    unsafe { blk_get_size64(f.as_raw_fd(), &mut size) }.map_err(errno)?;
    Ok(size)
}

#[async_trait]
impl Mounter for SysMounter {
    async fn probe(&self, device: &Path) -> Result<Option<Signature>, MountError> {
        // -p bypasses the cache and reads the device itself; exit 2 means "no signature".
        let out = self
            .runner
            .run(
                "blkid",
                [
                    Path::new("-p"),
                    Path::new("-o"),
                    Path::new("export"),
                    device,
                ],
                &[2],
            )
            .await?;
        if out.status.code() == Some(2) {
            // blkid also reports "nothing found" when it could not read the device.
            let dev = device.to_path_buf();
            return match crate::blocking::run_blocking(move || confirm_readable(&dev)).await {
                Ok(()) => Ok(None),
                Err(source) => Err(MountError::Unreadable {
                    device: device.to_path_buf(),
                    source,
                }),
            };
        }
        let value = |key: &str| {
            out.stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Ok(match (value("TYPE"), value("PTTYPE")) {
            (Some(fs), _) => Some(Signature::Filesystem(fs)),
            (None, Some(pt)) => Some(Signature::Other(format!("partition table {pt}"))),
            (None, None) => Some(Signature::Other(out.stdout.replace('\n', " "))),
        })
    }

    async fn format(&self, device: &Path, fs: FsType) -> Result<(), MountError> {
        // No force flags: if a signature appeared since the probe, mkfs refuses.
        match fs {
            FsType::Ext4 => {
                self.runner
                    .run(
                        "mkfs.ext4",
                        [
                            Path::new("-q"),
                            Path::new("-E"),
                            Path::new("lazy_itable_init=1,lazy_journal_init=1"),
                            device,
                        ],
                        &[],
                    )
                    .await?
            }
            FsType::Xfs => {
                self.runner
                    .run("mkfs.xfs", [Path::new("-q"), device], &[])
                    .await?
            }
        };
        Ok(())
    }

    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs: FsType,
        opts: &MountOptions,
    ) -> Result<(), MountError> {
        let (device, target, opts) = (device.to_path_buf(), target.to_path_buf(), opts.clone());
        let root = self.beneath.clone();
        blocking(move || {
            let data = opts.data.join(",");
            let pinned = pin(root.as_deref(), "mount", &target)?;
            nix::mount::mount(
                Some(&device),
                &pinned.path,
                Some(fs.as_str()),
                opts.flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|e| sys("mount", &target)(errno(e)))
        })
        .await
    }

    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        let (source, target) = (source.to_path_buf(), target.to_path_buf());
        let root = self.beneath.clone();
        blocking(move || {
            // Both ends: a swapped source would show the pod another host directory.
            let from = pin(root.as_deref(), "bind mount from", &source)?;
            let onto = pin(root.as_deref(), "bind mount", &target)?;
            nix::mount::mount(
                Some(&from.path),
                &onto.path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| sys("bind mount", &target)(errno(e)))?;
            if read_only {
                // A bind mount ignores MS_RDONLY on creation; it takes a remount, of
                // the new mount itself: confined, it is reached through the pinned
                // parent and checked to be read-only afterwards.
                let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                let remounted = match onto._fd {
                    Some(_) => remount_read_only_beneath(root.as_deref(), &from, &target),
                    None => {
                        nix::mount::mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
                            .map_err(|e| sys("remount read-only", &target)(errno(e)))
                    }
                };
                if let Err(e) = remounted {
                    // Through the descriptor held since before the bind: umount2 of it
                    // removes the mount stacked there, wherever its path now leads.
                    let _ = nix::mount::umount2(&onto.path, MntFlags::empty());
                    return Err(e);
                }
            }
            Ok(())
        })
        .await
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let original = target.to_path_buf();
        let target = resolved(target);
        let this = self.clone();
        blocking(move || {
            let confined = this.beneath.as_deref().filter(|r| original.starts_with(r));
            if let Some(root) = confined {
                if !target.starts_with(root) {
                    return Err(MountError::OutsideRoot {
                        op: "unmount",
                        path: original,
                        reason: format!(
                            "resolves to {} outside {}",
                            target.display(),
                            root.display()
                        ),
                    });
                }
            }
            // Bounded: each pass removes the top of a stack of mounts on the path.
            for _ in 0..8 {
                let info = this.read_mountinfo()?;
                if mountinfo::find_mount(&info, &target).is_none() {
                    return Ok(());
                }
                // Confined: through the pinned parent, so a parent swapped since the
                // check cannot move the unmount elsewhere.
                let parent = match (confined, target.parent()) {
                    (Some(root), Some(parent)) => Some(pin(Some(root), "unmount", parent)?),
                    _ => None,
                };
                let path = match (&parent, target.file_name()) {
                    (Some(p), Some(name)) => p.path.join(name),
                    _ => target.clone(),
                };
                match nix::mount::umount2(&path, MntFlags::UMOUNT_NOFOLLOW) {
                    Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                    Err(e) => return Err(sys("unmount", &target)(errno(e))),
                }
            }
            Err(sys("unmount", &target)(std::io::Error::other(
                "still mounted after 8 unmounts",
            )))
        })
        .await
    }

    /// Confined: each missing directory is made in its parent opened beneath the root,
    /// so a component swapped for a symlink cannot make this create directories
    /// elsewhere.
    async fn make_dir(&self, path: &Path) -> Result<(), MountError> {
        let root = self.beneath.clone();
        let path = path.to_path_buf();
        blocking(move || {
            let Some(root) = root.filter(|r| path.starts_with(r)) else {
                return std::fs::create_dir_all(&path).map_err(sys("create directory", &path));
            };
            let rel = path
                .strip_prefix(&root)
                .unwrap_or(Path::new(""))
                .to_path_buf();
            let mut made = root.clone();
            for part in rel.components() {
                let std::path::Component::Normal(name) = part else {
                    return Err(MountError::OutsideRoot {
                        op: "create directory",
                        path: path.clone(),
                        reason: format!("{part:?} is not a plain name"),
                    });
                };
                let parent = pin(Some(&root), "create directory", &made)?;
                let dir = parent._fd.as_ref().expect("confined paths are pinned");
                match nix::sys::stat::mkdirat(
                    dir,
                    name,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(sys("create directory", &path)(errno(e))),
                }
                made.push(name);
            }
            // What exists now is a directory beneath the root.
            pin(Some(&root), "create directory", &path).map(drop)
        })
        .await
    }

    /// Confined: created in its parent opened beneath the root, never through a symlink.
    async fn make_file(&self, path: &Path) -> Result<(), MountError> {
        let root = self.beneath.clone();
        let path = path.to_path_buf();
        blocking(move || {
            let Some((root, parent, name)) = confined_entry(root, &path) else {
                return create_new_file(&path).map_err(sys("create file", &path));
            };
            let parent = pin(Some(&root), "create file", parent)?;
            let dir = parent._fd.as_ref().expect("confined paths are pinned");
            use nix::fcntl::OFlag;
            match nix::fcntl::openat(
                dir,
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::from_bits_truncate(0o644),
            ) {
                Ok(_) | Err(nix::errno::Errno::EEXIST) => Ok(()),
                Err(e) => Err(sys("create file", &path)(errno(e))),
            }
        })
        .await
    }

    /// Confined: removed as an entry of its pinned parent (a symlink is removed itself,
    /// never followed), so a swapped parent cannot make this delete a host file.
    async fn remove_mount_point(&self, path: &Path) -> Result<(), MountError> {
        let root = self.beneath.clone();
        let path = path.to_path_buf();
        blocking(move || {
            let Some((root, parent, name)) = confined_entry(root, &path) else {
                return remove_entry(&path).map_err(sys("remove", &path));
            };
            let parent = match pin(Some(&root), "remove", parent) {
                Ok(p) => p,
                Err(MountError::Sys { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            let dir = parent._fd.as_ref().expect("confined paths are pinned");
            use nix::fcntl::AtFlags;
            use nix::sys::stat::SFlag;
            let st = match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(nix::errno::Errno::ENOENT) => return Ok(()),
                Err(e) => return Err(sys("remove", &path)(errno(e))),
            };
            let how = if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                nix::unistd::UnlinkatFlags::RemoveDir
            } else {
                nix::unistd::UnlinkatFlags::NoRemoveDir
            };
            match nix::unistd::unlinkat(dir, name, how) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
                Err(e) => Err(sys("remove", &path)(errno(e))),
            }
        })
        .await
    }

    async fn mount_at(&self, target: &Path) -> Result<Option<MountEntry>, MountError> {
        let target = resolved(target);
        let this = self.clone();
        blocking(move || Ok(mountinfo::find_mount(&this.read_mountinfo()?, &target))).await
    }

    async fn mounts_of(&self, major: u32, minor: u32) -> Result<Vec<MountEntry>, MountError> {
        let this = self.clone();
        blocking(move || Ok(mountinfo::mounts_of(&this.read_mountinfo()?, major, minor))).await
    }

    async fn grow(&self, device: &Path, mount_point: &Path, fs: FsType) -> Result<(), MountError> {
        match fs {
            FsType::Ext4 => {
                if !has_capability(CAP_SYS_RESOURCE) {
                    return Err(MountError::MissingCapability {
                        what: "growing a mounted ext4 filesystem",
                        capability: "CAP_SYS_RESOURCE",
                    });
                }
                self.runner.run("resize2fs", [device], &[]).await?
            }
            // xfs grows through its mount point.
            FsType::Xfs => self.runner.run("xfs_growfs", [mount_point], &[]).await?,
        };
        Ok(())
    }

    async fn stats(&self, path: &Path) -> Result<VolumeStats, MountError> {
        let path = path.to_path_buf();
        blocking(move || {
            let meta = std::fs::metadata(&path).map_err(sys("stat", &path))?;
            if meta.file_type().is_block_device() {
                let total_bytes = block_device_size(&path).map_err(sys("size", &path))?;
                return Ok(VolumeStats::Block { total_bytes });
            }
            let st =
                nix::sys::statvfs::statvfs(&path).map_err(|e| sys("statvfs", &path)(errno(e)))?;
            let frsize = st.fragment_size();
            let blocks = st.blocks();
            Ok(VolumeStats::Filesystem {
                total_bytes: blocks * frsize,
                available_bytes: st.blocks_available() * frsize,
                used_bytes: blocks.saturating_sub(st.blocks_free()) * frsize,
                total_inodes: st.files(),
                available_inodes: st.files_available(),
                used_inodes: st.files().saturating_sub(st.files_free()),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csi_mount_flags_split_into_kernel_flags_and_data() {
        let flags: Vec<String> = ["noatime", "discard", "nodev", "data=ordered"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = MountOptions::parse(&flags, false);
        assert_eq!(o.flags, MsFlags::MS_NOATIME | MsFlags::MS_NODEV);
        assert_eq!(o.data, vec!["discard", "data=ordered"]);
        let ro = MountOptions::parse(&[], true);
        assert_eq!(ro.flags, MsFlags::MS_RDONLY);
    }

    /// Both ways of opening beneath the kubelet dir: openat2 (symlinks that stay inside
    /// work, leaving is refused) and the walk for kernels without it (no symlink at all).
    #[test]
    fn paths_are_opened_beneath_the_root_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("kubelet");
        std::fs::create_dir_all(root.join("real/a")).unwrap();
        std::fs::create_dir_all(base.join("outside/a")).unwrap();
        std::os::unix::fs::symlink("real", root.join("inside")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let opened = |fd: &std::os::fd::OwnedFd| nix::sys::stat::fstat(fd).unwrap().st_ino;
        let real_a = ino(&root.join("real/a")).unwrap();

        let fd = open_beneath(&root, Path::new("inside/a")).ok().unwrap();
        assert_eq!(opened(&fd), real_a);
        for escape in ["out/a", "up/a"] {
            assert!(
                matches!(
                    open_beneath(&root, Path::new(escape)),
                    Err(Beneath::Outside(_))
                ),
                "{escape}"
            );
        }

        let at = || {
            nix::fcntl::open(
                &root,
                nix::fcntl::OFlag::O_PATH,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap()
        };
        let fd = walk_beneath(at(), Path::new("real/a")).ok().unwrap();
        assert_eq!(opened(&fd), real_a);
        for refused in ["inside/a", "out/a", "up/a"] {
            assert!(
                matches!(
                    walk_beneath(at(), Path::new(refused)),
                    Err(Beneath::Outside(_))
                ),
                "{refused}"
            );
        }
        assert!(matches!(
            walk_beneath(at(), Path::new("real/missing")),
            Err(Beneath::Io(_))
        ));
        // Outside the root, paths are the driver's own (device nodes): used as they are.
        let p = pin(Some(&root), "mount", Path::new("/dev/null")).unwrap();
        assert_eq!(p.path, Path::new("/dev/null"));
        let p = pin(Some(&root), "mount", &root.join("inside/a")).unwrap();
        assert!(p.path.starts_with("/proc/self/fd/"));
        assert_eq!(ino(&p.path).unwrap(), real_a);
    }
}
