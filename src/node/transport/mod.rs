//! Node transports: turn an export into a block device on this node, find it again after
//! a restart, and release it. `loop` today; NVMe/TCP and NBD implement the same trait.

pub mod dispatch;
pub mod loopdev;
pub mod nbd;
pub mod nbd_kernel;
pub mod nvme;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::export::ExportInfo;
use crate::ids::VolumeId;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("export path {path:?} is not the image of volume {volume} in this node's data dir; refusing to attach it")]
    ForeignImage { volume: VolumeId, path: PathBuf },
    #[error("image {0:?} does not exist on this node: is the data dir (shared filesystem) mounted here?")]
    ImageMissing(PathBuf),
    #[error("direct I/O could not be enabled on {device:?} for {image:?}; the data dir's filesystem must support O_DIRECT so that nodes sharing it stay coherent")]
    DirectIoUnavailable { device: PathBuf, image: PathBuf },
    #[error("publish_context asks for the {0} transport, which this node plugin does not run; check its --nbd-run-dir/flags or the StorageClass's dataPlane")]
    Unsupported(&'static str),
    #[error("publish_context names NVMe subsystem {nqn:?}, which is not volume {volume}'s under this driver's NQN prefix; refusing to touch it")]
    ForeignSubsystem { volume: VolumeId, nqn: String },
    #[error("NVMe/TCP connect for volume {volume} failed: {reason}")]
    NvmeConnect { volume: VolumeId, reason: String },
    #[error("NBD client for volume {volume} did not come up: {reason}")]
    NbdClient { volume: VolumeId, reason: String },
    #[error("{device:?} is still open by another process after NBD_CMD_DISCONNECT; it is released once that process closes it")]
    DeviceBusy { device: PathBuf },
    #[error("no free loop device after {attempts} attempts (other processes keep taking them)")]
    NoFreeDevice { attempts: u32 },
    #[error("{op} {path:?}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A block device that carries a volume on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub volume_id: VolumeId,
    pub path: PathBuf,
    /// The backing image was deleted while attached: I/O continues on an orphan.
    pub backing_deleted: bool,
}

#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Attaches the export, or returns the device already carrying this volume.
    async fn connect(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        read_only: bool,
    ) -> Result<Device, TransportError>;
    async fn find_device(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError>;
    /// Releases the device; an already released device is success.
    async fn disconnect(&self, device: &Device) -> Result<(), TransportError>;
    /// Every device this transport holds for this driver (adoption after restart).
    async fn list(&self) -> Result<Vec<Device>, TransportError>;
    /// Makes the device pick up a grown volume (ControllerExpandVolume grew the image).
    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError>;
    /// Whether this node can attach anything at all (for the Identity Probe).
    async fn probe(&self) -> Result<(), TransportError>;
}

/// A system call's error, with the operation and the path it was made on.
pub(crate) fn sys_err(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> TransportError {
    let path = path.to_path_buf();
    move |source| TransportError::Sys { op, path, source }
}
