//! Copying images for snapshots and clones: a reflink (FICLONE) where the filesystem can
//! share extents (btrfs, xfs with reflink=1) — instant, space-free and a point-in-time
//! copy even while the source is written — otherwise a sparse-aware copy that skips holes
//! (SEEK_DATA/SEEK_HOLE + copy_file_range), which is only consistent if nobody writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// _IOW(0x94, 9, int)
const FICLONE: libc::c_ulong = 0x4004_9409;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the data dir's filesystem cannot reflink, and a plain copy of an image in use would not be a consistent point-in-time copy")]
    NotAtomic,
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let mut offset: i64 = 0;
    let len = len as i64;
    while offset < len {
        // SAFETY: plain lseek on an open fd.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut from, mut to) = (data, data);
        while from < hole {
            // SAFETY: offsets point at live i64s; the kernel copies between the fds.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut from,
                    dst.as_raw_fd(),
                    &mut to,
                    (hole - from) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        offset = hole;
    }
    Ok(())
}

/// Copies `src` to a new file `dst` (which must not exist) and syncs it. With
/// `need_atomic` the copy must be a reflink; otherwise a sparse copy is the fallback.
pub fn copy_image(src: &Path, dst: &Path, need_atomic: bool) -> Result<CopyMethod, CopyError> {
    let source = File::open(src)?;
    let len = source.metadata()?.len();
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let result = match reflink(&source, &target) {
        Ok(()) => Ok(CopyMethod::Reflink),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY)
            ) =>
        {
            if need_atomic {
                Err(CopyError::NotAtomic)
            } else {
                sparse_copy(&source, &target, len)
                    .map(|()| CopyMethod::Sparse)
                    .map_err(CopyError::from)
            }
        }
        Err(e) => Err(e.into()),
    };
    let result = result.and_then(|m| target.sync_all().map(|()| m).map_err(CopyError::from));
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        f.sync_all().unwrap();
        // /tmp here is ext4: no reflink, so the sparse path runs (xfs/btrfs reflink is
        // covered by the privileged snapshot test).
        let method = copy_image(&src, &dst, false).unwrap();
        let out = File::open(&dst).unwrap();
        let mut buf = [0u8; 6];
        out.read_exact_at(&mut buf, 32 << 20).unwrap();
        assert_eq!(&buf, b"middle");
        out.read_exact_at(&mut buf[..3], (64 << 20) - 3).unwrap();
        assert_eq!(&buf[..3], b"end");
        assert_eq!(out.metadata().unwrap().len(), 64 << 20);
        if method == CopyMethod::Sparse {
            assert!(
                out.metadata().unwrap().blocks() * 512 < 4 << 20,
                "holes stay holes"
            );
        }
    }

    #[test]
    fn atomic_copy_is_refused_without_reflink_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
        File::create(&src).unwrap().set_len(1 << 20).unwrap();
        match copy_image(&src, &dst, true) {
            Ok(CopyMethod::Reflink) => {} // a reflink-capable /tmp
            Err(CopyError::NotAtomic) => assert!(!dst.exists()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
