//! The data-plane fence, ordered by the AttachmentManager against its store: a holder
//! leaves durable state only after the storage target confirmed it is cut off, so a
//! failed fence can never free a slot for another writer.

use async_trait::async_trait;

use crate::backend::Fencing;
use crate::ids::{NodeId, VolumeId};

#[derive(Debug, thiserror::Error)]
#[error("node {node} could not be cut off from volume {volume} at the storage target: {reason}")]
pub struct FenceError {
    pub volume: VolumeId,
    pub node: NodeId,
    pub reason: String,
}

/// What a fence achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceReport {
    pub method: Fencing,
    /// Live connections the target dropped, where it can tell (NBD counts them; nvmet
    /// and RouterOS drop every connection of the export without saying how many).
    pub connections: Option<usize>,
}

impl FenceReport {
    /// Nothing to cut: the node reaches the data through a filesystem.
    pub const NONE: FenceReport = FenceReport {
        method: Fencing::None,
        connections: Some(0),
    };
}

#[async_trait]
pub trait NodeFence: Send + Sync + 'static {
    /// Cuts `node` off `volume`; Ok only once the target confirmed it (idempotent).
    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<FenceReport, FenceError>;
    /// True when there is never anything to cut (no grants exist either), so the
    /// manager can skip marking a leaving node before its fence.
    fn is_noop(&self) -> bool {
        false
    }
}

/// No data plane to fence at (the embedded file plane, tests of the rules).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFence;

#[async_trait]
impl NodeFence for NoFence {
    async fn fence(&self, _volume: &VolumeId, _node: &NodeId) -> Result<FenceReport, FenceError> {
        Ok(FenceReport::NONE)
    }
    fn is_noop(&self) -> bool {
        true
    }
}
