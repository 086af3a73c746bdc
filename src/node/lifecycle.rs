//! Stage, publish, unpublish and unstage on this node. Each step checks what is already
//! there first, so a repeated call (kubelet retries) converges instead of stacking mounts.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use super::mount::{block_device_size, MountError, MountOptions, Mounter, Signature, VolumeStats};
use super::transport::{Device, Transport, TransportError};
use crate::capability::{AccessType, Capability, FsType};
use crate::export::ExportInfo;
use crate::ids::VolumeId;
use crate::locks::{Busy, OperationLocks};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("volume {0} is not staged on this node: NodeStageVolume must succeed first")]
    NotStaged(VolumeId),
    #[error("{path:?} already has something else mounted ({found}); refusing to mount volume {volume} over it")]
    PathInUse {
        volume: VolumeId,
        path: PathBuf,
        found: String,
    },
    #[error("volume {volume} already carries {found}, not the requested {wanted}; it is never reformatted")]
    FilesystemMismatch {
        volume: VolumeId,
        found: String,
        wanted: &'static str,
    },
    #[error("volume {volume} is still mounted at {paths:?}; NodeUnpublishVolume those first")]
    StillPublished {
        volume: VolumeId,
        paths: Vec<PathBuf>,
    },
    #[error("{path:?} does not exist")]
    PathNotFound { path: PathBuf },
    #[error("volume {volume} is not at {path:?}: that path {reason}")]
    NotAtPath {
        volume: String,
        path: String,
        reason: String,
    },
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Health of a published or staged volume, for NodeGetVolumeStats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

pub struct NodeVolumes {
    transport: Arc<dyn Transport>,
    mounter: Arc<dyn Mounter>,
    locks: OperationLocks,
    /// Bounds concurrent mkfs/mount work: a burst of pods must not fork dozens of mkfs
    /// processes on one node.
    filesystem_work: tokio::sync::Semaphore,
}

async fn device_numbers(path: &Path) -> Result<(u32, u32), NodeError> {
    let p = path.to_path_buf();
    let meta = crate::blocking::run_blocking(move || std::fs::metadata(p))
        .await
        .map_err(io("stat", path))?;
    let rdev = meta.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

impl NodeVolumes {
    pub fn new(
        transport: Arc<dyn Transport>,
        mounter: Arc<dyn Mounter>,
        max_filesystem_work: usize,
    ) -> Self {
        NodeVolumes {
            transport,
            mounter,
            locks: OperationLocks::new(),
            filesystem_work: tokio::sync::Semaphore::new(max_filesystem_work.max(1)),
        }
    }

    pub async fn stage(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        staging: &Path,
        cap: &Capability,
    ) -> Result<(), NodeError> {
        let _guard = self.locks.try_lock(format!("volume {volume}"))?;
        let device = self
            .transport
            .connect(volume, export, cap.mode.is_read_only())
            .await?;
        let AccessType::Mount { fs_type, flags } = &cap.access_type else {
            // Block: the attached device is the staged state; publish binds it.
            return Ok(());
        };
        self.mounter.make_dir(staging).await?;
        let (major, minor) = device_numbers(&device.path).await?;
        if let Some(m) = self.mounter.mount_at(staging).await? {
            return if (m.major, m.minor) == (major, minor) {
                Ok(())
            } else {
                Err(NodeError::PathInUse {
                    volume: volume.clone(),
                    path: staging.to_path_buf(),
                    found: format!("{} from {}", m.fs_type, m.source),
                })
            };
        }
        let _permit = self
            .filesystem_work
            .acquire()
            .await
            .expect("the semaphore is never closed");
        self.ensure_filesystem(volume, &device, *fs_type, cap.mode.is_read_only())
            .await?;
        let mut opts = MountOptions::parse(flags, cap.mode.is_read_only());
        // Restores and clones carry their source's xfs UUID; without nouuid the second
        // of the two would not mount on a node that has both.
        if *fs_type == FsType::Xfs && !opts.data.iter().any(|o| o == "nouuid") {
            opts.data.push("nouuid".into());
        }
        self.mounter
            .mount(&device.path, staging, *fs_type, &opts)
            .await?;
        if !cap.mode.is_read_only() {
            self.grow_to_device(volume, &device, staging, *fs_type)
                .await;
        }
        info!(volume_id = %volume, device = %device.path.display(), "staged");
        Ok(())
    }

    /// A volume restored or cloned into a larger size, or expanded while detached, has
    /// a filesystem smaller than its device: grow it at stage so the pod sees what the
    /// claim asked for. Best effort: the volume is usable either way.
    async fn grow_to_device(
        &self,
        volume: &VolumeId,
        device: &Device,
        mount_point: &Path,
        fs: FsType,
    ) {
        let path = device.path.clone();
        let Ok(device_size) = crate::blocking::run_blocking(move || block_device_size(&path)).await
        else {
            return;
        };
        let Ok(VolumeStats::Filesystem { total_bytes, .. }) = self.mounter.stats(mount_point).await
        else {
            return;
        };
        // Filesystem metadata takes a few percent; only a real gap is worth a resize.
        if total_bytes + device_size / 8 >= device_size {
            return;
        }
        match self.mounter.grow(&device.path, mount_point, fs).await {
            Ok(()) => {
                info!(volume_id = %volume, device_size, "filesystem grown to its device at stage")
            }
            Err(e) => {
                tracing::warn!(volume_id = %volume, error = %e, "filesystem is smaller than its device and could not grow")
            }
        }
    }

    async fn ensure_filesystem(
        &self,
        volume: &VolumeId,
        device: &Device,
        fs: FsType,
        read_only: bool,
    ) -> Result<(), NodeError> {
        match self.mounter.probe(&device.path).await? {
            Some(Signature::Filesystem(found)) if found == fs.as_str() => Ok(()),
            Some(Signature::Filesystem(found)) | Some(Signature::Other(found)) => {
                Err(NodeError::FilesystemMismatch {
                    volume: volume.clone(),
                    found,
                    wanted: fs.as_str(),
                })
            }
            None if read_only => Err(NodeError::FilesystemMismatch {
                volume: volume.clone(),
                found: "no filesystem (a read-only volume cannot be formatted)".into(),
                wanted: fs.as_str(),
            }),
            None => {
                info!(volume_id = %volume, fs = fs.as_str(), "formatting new volume");
                Ok(self.mounter.format(&device.path, fs).await?)
            }
        }
    }

    pub async fn unstage(&self, volume: &VolumeId, staging: &Path) -> Result<(), NodeError> {
        let _guard = self.locks.try_lock(format!("volume {volume}"))?;
        self.mounter.unmount(staging).await?;
        let Some(device) = self.transport.find_device(volume).await? else {
            return Ok(());
        };
        // Detaching under a live publish would yank the disk from a running VM.
        let (major, minor) = device_numbers(&device.path).await?;
        let mut users: Vec<PathBuf> = self
            .mounter
            .mounts_of(major, minor)
            .await?
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        let name = device
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let devtmpfs_root = format!("/{name}");
        users.extend(self.device_binds(&devtmpfs_root).await?);
        if !users.is_empty() {
            return Err(NodeError::StillPublished {
                volume: volume.clone(),
                paths: users,
            });
        }
        self.transport.disconnect(&device).await?;
        info!(volume_id = %volume, device = %device.path.display(), "unstaged");
        Ok(())
    }

    /// Bind mounts of a device node (block publishes) show up with the node as root.
    async fn device_binds(&self, root: &str) -> Result<Vec<PathBuf>, NodeError> {
        let dev = self.mounter.mount_at(Path::new("/dev")).await?;
        let Some(dev) = dev else { return Ok(vec![]) };
        Ok(self
            .mounter
            .mounts_of(dev.major, dev.minor)
            .await?
            .into_iter()
            .filter(|m| m.root == root)
            .map(|m| m.mount_point)
            .collect())
    }

    pub async fn publish(
        &self,
        volume: &VolumeId,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        read_only: bool,
    ) -> Result<(), NodeError> {
        let _guard = self.locks.try_lock(format!("volume {volume}"))?;
        let read_only = read_only || cap.mode.is_read_only();
        let source = match cap.access_type {
            AccessType::Block => {
                let device = self
                    .transport
                    .find_device(volume)
                    .await?
                    .ok_or_else(|| NodeError::NotStaged(volume.clone()))?;
                self.mounter.make_file(target).await?;
                let numbers = self.mounter.block_device_at(&device.path).await?;
                if self.mounter.mount_at(target).await?.is_some() {
                    let same =
                        numbers.is_some() && self.mounter.block_device_at(target).await? == numbers;
                    return self.already_published(volume, target, same);
                }
                device.path
            }
            AccessType::Mount { .. } => {
                let staged = self
                    .mounter
                    .mount_at(staging)
                    .await?
                    .ok_or_else(|| NodeError::NotStaged(volume.clone()))?;
                self.mounter.make_dir(target).await?;
                if let Some(m) = self.mounter.mount_at(target).await? {
                    let same = (m.major, m.minor) == (staged.major, staged.minor)
                        && m.read_only == read_only;
                    return self.already_published(volume, target, same);
                }
                staging.to_path_buf()
            }
        };
        self.mounter.bind(&source, target, read_only).await?;
        info!(volume_id = %volume, target = %target.display(), read_only, "published");
        Ok(())
    }

    fn already_published(
        &self,
        volume: &VolumeId,
        target: &Path,
        same: bool,
    ) -> Result<(), NodeError> {
        if same {
            Ok(())
        } else {
            Err(NodeError::PathInUse {
                volume: volume.clone(),
                path: target.to_path_buf(),
                found: "a different mount or read-only setting".into(),
            })
        }
    }

    pub async fn unpublish(&self, volume: &VolumeId, target: &Path) -> Result<(), NodeError> {
        let _guard = self.locks.try_lock(format!("volume {volume}"))?;
        self.mounter.unmount(target).await?;
        self.mounter.remove_mount_point(target).await?;
        info!(volume_id = %volume, target = %target.display(), "unpublished");
        Ok(())
    }

    /// NodeExpandVolume: the device re-reads the grown image; a mounted filesystem grows
    /// online. Returns the new device size.
    pub async fn expand(&self, volume: &VolumeId, volume_path: &Path) -> Result<u64, NodeError> {
        let _guard = self.locks.try_lock(format!("volume {volume}"))?;
        let device = self
            .transport
            .find_device(volume)
            .await?
            .ok_or_else(|| NodeError::NotStaged(volume.clone()))?;
        self.transport.refresh_capacity(&device).await?;
        let path = device.path.clone();
        let size = crate::blocking::run_blocking(move || block_device_size(&path))
            .await
            .map_err(io("size", &device.path))?;
        if let Some(m) = self.mounter.mount_at(volume_path).await? {
            let fs = match m.fs_type.as_str() {
                "ext4" => Some(FsType::Ext4),
                "xfs" => Some(FsType::Xfs),
                _ => None, // a block publish: nothing to grow
            };
            if let Some(fs) = fs {
                self.mounter.grow(&device.path, volume_path, fs).await?;
                info!(volume_id = %volume, size, "filesystem grown online");
            }
        }
        Ok(size)
    }

    pub async fn stats(
        &self,
        volume: &VolumeId,
        path: &Path,
    ) -> Result<(VolumeStats, Condition), NodeError> {
        if !path.exists() {
            return Err(NodeError::PathNotFound {
                path: path.to_path_buf(),
            });
        }
        let stats = self.mounter.stats(path).await?;
        let condition = match self.transport.find_device(volume).await? {
            None => Condition {
                abnormal: true,
                message: format!("no device carries volume {volume} on this node"),
            },
            Some(d) if d.backing_deleted => Condition {
                abnormal: true,
                message: format!(
                    "the image behind {} was deleted while attached; data written now is lost at detach",
                    d.path.display()
                ),
            },
            Some(d) => match self.mounter.mount_at(path).await? {
                // Written read-write, now read-only underneath: the kernel stopped
                // writes after an I/O or corruption error.
                Some(m) if m.fs_read_only && !m.read_only => Condition {
                    abnormal: true,
                    message: format!(
                        "the {} filesystem on {} went read-only after an error; check the node's kernel log and run fsck",
                        m.fs_type,
                        d.path.display()
                    ),
                },
                _ => Condition {
                    abnormal: false,
                    message: format!("attached as {}", d.path.display()),
                },
            },
        };
        Ok((stats, condition))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::capability::AccessMode;
    use crate::node::mountinfo::MountEntry;

    /// A transport whose "device" is /dev/null (real device numbers, no kernel work).
    struct FakeTransport;

    #[async_trait]
    impl Transport for FakeTransport {
        async fn connect(
            &self,
            volume: &VolumeId,
            _: &ExportInfo,
            _: bool,
        ) -> Result<Device, TransportError> {
            Ok(Device {
                volume_id: volume.clone(),
                path: "/dev/null".into(),
                backing_deleted: false,
            })
        }
        async fn find_device(&self, _: &VolumeId) -> Result<Option<Device>, TransportError> {
            Ok(None)
        }
        async fn disconnect(&self, _: &Device) -> Result<(), TransportError> {
            Ok(())
        }
        async fn list(&self) -> Result<Vec<Device>, TransportError> {
            Ok(vec![])
        }
        async fn refresh_capacity(&self, _: &Device) -> Result<(), TransportError> {
            Ok(())
        }
        async fn probe(&self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    /// A mounter whose mkfs is slow and counts how many run at once.
    #[derive(Default)]
    struct SlowMounter {
        running: AtomicUsize,
        peak: AtomicUsize,
    }

    #[async_trait]
    impl Mounter for SlowMounter {
        async fn probe(&self, _: &Path) -> Result<Option<Signature>, MountError> {
            Ok(None)
        }
        async fn format(&self, _: &Path, _: FsType) -> Result<(), MountError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        async fn mount(
            &self,
            _: &Path,
            _: &Path,
            _: FsType,
            _: &MountOptions,
        ) -> Result<(), MountError> {
            Ok(())
        }
        async fn bind(&self, _: &Path, _: &Path, _: bool) -> Result<(), MountError> {
            Ok(())
        }
        async fn unmount(&self, _: &Path) -> Result<(), MountError> {
            Ok(())
        }
        async fn mount_at(&self, _: &Path) -> Result<Option<MountEntry>, MountError> {
            Ok(None)
        }
        async fn mounts_of(&self, _: u32, _: u32) -> Result<Vec<MountEntry>, MountError> {
            Ok(vec![])
        }
        async fn stats(&self, _: &Path) -> Result<VolumeStats, MountError> {
            Ok(VolumeStats::Block { total_bytes: 0 })
        }
        async fn grow(&self, _: &Path, _: &Path, _: FsType) -> Result<(), MountError> {
            Ok(())
        }
    }

    fn mount_cap() -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: FsType::Ext4,
                flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        }
    }

    fn export() -> ExportInfo {
        ExportInfo::LocalFile { path: "/x".into() }
    }

    #[tokio::test]
    async fn overlapping_operations_on_one_volume_are_aborted_not_queued() {
        let mounter = Arc::new(SlowMounter::default());
        let nv = Arc::new(NodeVolumes::new(Arc::new(FakeTransport), mounter, 4));
        let dir = tempfile::tempdir().unwrap();
        let v = VolumeId::generate();
        let first = {
            let (nv, v, staging) = (nv.clone(), v.clone(), dir.path().join("s"));
            tokio::spawn(async move { nv.stage(&v, &export(), &staging, &mount_cap()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = nv
            .stage(&v, &export(), &dir.path().join("s"), &mount_cap())
            .await;
        assert!(matches!(second, Err(NodeError::Busy(_))), "{second:?}");
        let unpublish = nv.unpublish(&v, &dir.path().join("t")).await;
        assert!(matches!(unpublish, Err(NodeError::Busy(_))));
        first.await.unwrap().unwrap();
        nv.unpublish(&v, &dir.path().join("t")).await.unwrap();
    }

    #[tokio::test]
    async fn filesystem_work_is_bounded_per_node() {
        let mounter = Arc::new(SlowMounter::default());
        let nv = Arc::new(NodeVolumes::new(
            Arc::new(FakeTransport),
            mounter.clone(),
            2,
        ));
        let dir = tempfile::tempdir().unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (nv, staging) = (nv.clone(), dir.path().join(format!("s{i}")));
                tokio::spawn(async move {
                    nv.stage(&VolumeId::generate(), &export(), &staging, &mount_cap())
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            mounter.peak.load(Ordering::SeqCst),
            2,
            "never more than 2 mkfs at once"
        );
    }
}
