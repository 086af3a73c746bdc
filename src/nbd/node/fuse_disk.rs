//! `handoff-csi nbd-client`: presents one NBD export as the file `disk` in a FUSE mount,
//! so the node can attach a loop device to it — a real block device over the network.
//! It is its own process, so a restart of the node plugin does not interrupt I/O.
//!
//! Every request is retried over a fresh connection (bounded backoff) until
//! `io_timeout` has passed, then fails with EIO: never a hang forever. A refusal by the
//! target (the node was fenced, the attachment ended) fails at once and for good.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use parking_lot::Mutex;

use super::client::{ClientError, NbdClient};

/// The one file of the mount.
pub const DISK_NAME: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// FUSE worker threads, each with its own NBD connection: requests from the loop
/// device run in parallel instead of one at a time.
pub const WORKERS: usize = 4;

/// How to reach the export.
#[derive(Clone)]
pub struct Remote {
    pub address: String,
    /// Carries the attachment's secret: never logged.
    pub export: String,
    pub io_timeout: Duration,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("address", &self.address)
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

enum Op<'a> {
    Read(u64, u32),
    Write(u64, &'a [u8]),
    Flush,
    Trim(u64, u32),
}

struct Link {
    runtime: tokio::runtime::Runtime,
    client: Option<NbdClient>,
}

pub struct FuseDisk {
    remote: Remote,
    /// One connection per worker; a request takes whichever is free.
    links: Vec<Mutex<Link>>,
    size: AtomicU64,
    read_only: bool,
    /// The target refused us (fenced, or the attachment ended): every request fails.
    refused: AtomicBool,
}

/// Runs `fut` on the link's runtime for at most `limit`; `None` when it timed out. (The
/// timer is created inside the runtime, which tokio requires.)
pub(crate) fn within<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    limit: Duration,
    fut: F,
) -> Option<F::Output> {
    rt.block_on(async move { tokio::time::timeout(limit, fut).await.ok() })
}

fn errno_of(code: u32) -> Errno {
    Errno::from_i32(code as i32)
}

impl FuseDisk {
    /// Connects once (so a bad address or secret fails the start, not the first read).
    pub fn connect(remote: Remote) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Io)?;
        // "Ask again" is retried here too, within the I/O deadline.
        let deadline = Instant::now() + remote.io_timeout;
        let mut backoff = Duration::from_millis(50);
        let client = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match within(
                &runtime,
                left,
                NbdClient::connect(&remote.address, &remote.export),
            ) {
                Some(Err(e)) if e.retry_later() && !left.is_zero() => {
                    std::thread::sleep(backoff.min(left));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Some(result) => break result?,
                None => {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting to the NBD target timed out",
                    )))
                }
            }
        };
        let size = client.size();
        let read_only = client.read_only();
        let mut links = vec![Mutex::new(Link {
            runtime,
            client: Some(client),
        })];
        for _ in 1..WORKERS {
            // Connected on first use.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ClientError::Io)?;
            links.push(Mutex::new(Link {
                runtime,
                client: None,
            }));
        }
        Ok(FuseDisk {
            size: AtomicU64::new(size),
            read_only,
            remote,
            links,
            refused: AtomicBool::new(false),
        })
    }

    /// Runs `op`, reconnecting after connection failures until the I/O deadline.
    fn execute(&self, op: Op<'_>) -> Result<Vec<u8>, Errno> {
        if self.refused.load(Ordering::SeqCst) {
            return Err(Errno::EIO);
        }
        let deadline = Instant::now() + self.remote.io_timeout;
        let mut backoff = Duration::from_millis(50);
        let mut link = self.free_link();
        let Link { runtime, client } = &mut *link;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(address = %self.remote.address, "NBD I/O timed out; failing the request");
                return Err(Errno::EIO);
            }
            if client.is_none() {
                match within(
                    runtime,
                    left,
                    NbdClient::connect(&self.remote.address, &self.remote.export),
                ) {
                    Some(Ok(c)) => {
                        self.size.store(c.size(), Ordering::SeqCst);
                        tracing::info!(address = %self.remote.address, "NBD connection re-established");
                        *client = Some(c);
                    }
                    Some(Err(e)) if e.retry_later() => {
                        // The target could not check this node now: not a refusal.
                        tracing::info!(address = %self.remote.address, "NBD target asked to retry; backing off");
                        std::thread::sleep(backoff.min(left));
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    Some(Err(ClientError::Refused { .. })) => {
                        tracing::warn!(address = %self.remote.address, "NBD target refused this node: fenced or detached; all I/O fails from now on");
                        self.refused.store(true, Ordering::SeqCst);
                        return Err(Errno::EIO);
                    }
                    Some(Err(_)) | None => {
                        std::thread::sleep(backoff.min(left));
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let c = client.as_mut().expect("connected above");
            let result = within(runtime, left, async {
                match &op {
                    Op::Read(off, len) => c.read(*off, *len).await,
                    Op::Write(off, data) => c.write(*off, data, false).await.map(|_| Vec::new()),
                    Op::Flush => c.flush().await.map(|_| Vec::new()),
                    Op::Trim(off, len) => c.trim(*off, *len).await.map(|_| Vec::new()),
                }
            });
            match result {
                Some(Ok(data)) => return Ok(data),
                // The target answered: an error of the request, not of the link.
                Some(Err(ClientError::Errno(code))) => return Err(errno_of(code)),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "NBD connection lost; reconnecting");
                    *client = None;
                }
                None => *client = None,
            }
        }
    }

    /// A link no other worker is using (there are as many links as workers).
    fn free_link(&self) -> parking_lot::MutexGuard<'_, Link> {
        self.links
            .iter()
            .find_map(|l| l.try_lock())
            .unwrap_or_else(|| self.links[0].lock())
    }

    fn disk_attr(&self) -> FileAttr {
        let size = self.size.load(Ordering::SeqCst);
        FileAttr {
            ino: DISK_INO,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// Asks the target for the export's current size (an expansion becomes visible on
    /// the next stat, which LOOP_SET_CAPACITY's caller does first).
    fn refresh_size(&self) {
        let link = self.free_link();
        let info = within(
            &link.runtime,
            Duration::from_secs(5),
            NbdClient::export_size(&self.remote.address, &self.remote.export),
        );
        if let Some(Ok(size)) = info {
            self.size.store(size, Ordering::SeqCst);
        }
    }
}

fn dir_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo::ROOT,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o700,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl Filesystem for FuseDisk {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == DISK_NAME {
            self.refresh_size();
            reply.entry(&Duration::ZERO, &self.disk_attr(), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&Duration::from_secs(60), &dir_attr()),
            DISK_INO => {
                self.refresh_size();
                // TTL 0: every stat asks again, so a grown export is seen.
                reply.attr(&Duration::ZERO, &self.disk_attr())
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == DISK_INO {
            // No page cache on this node: after a migration, reads must come from the
            // target, never from what this node cached before.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = self.size.load(Ordering::SeqCst);
        let size = u64::from(size).min(end.saturating_sub(offset)) as u32;
        if size == 0 {
            return reply.data(&[]);
        }
        match self.execute(Op::Read(offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.execute(Op::Write(offset, data)) {
            Ok(_) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.execute(Op::Flush) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.execute(Op::Flush) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // The loop device turns discards into hole punches.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if mode != punch || length > u64::from(u32::MAX) {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        match self.execute(Op::Trim(offset, length as u32)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts the disk at `mountpoint` and serves it until the mount goes away.
pub fn serve(disk: FuseDisk, mountpoint: &Path) -> std::io::Result<()> {
    let mut config = Config::default();
    config.mount_options.extend([
        MountOption::FSName("handoff-nbd".into()),
        MountOption::Subtype("handoff-nbd".into()),
        MountOption::NoExec,
        MountOption::NoSuid,
        MountOption::NoDev,
    ]);
    config.n_threads = Some(WORKERS);
    fuser::mount(disk, mountpoint, &config)
}
