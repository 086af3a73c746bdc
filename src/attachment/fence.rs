//! The data-plane fence, ordered by the AttachmentManager against its store: a holder
//! leaves durable state only after the storage target confirmed it is cut off, so a
//! failed fence can never free a slot for another writer.

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::{Backend, Fencing};
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

/// The fence of a backend: at its target (nvmet ACLs, RouterOS allow list, the NBD
/// plane), recorded only, or nothing where nodes reach the data through a filesystem.
/// An error on the way (the volume's record, the target) is a failed fence.
pub struct BackendFence {
    backend: Arc<dyn Backend>,
}

impl BackendFence {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        BackendFence { backend }
    }
}

#[async_trait]
impl NodeFence for BackendFence {
    fn is_noop(&self) -> bool {
        self.backend.fencing() == Fencing::None
    }

    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<FenceReport, FenceError> {
        let failed = |reason: String| FenceError {
            volume: volume.clone(),
            node: node.clone(),
            reason,
        };
        let record = self
            .backend
            .get_volume(volume)
            .await
            .map_err(|e| failed(format!("cannot read the volume's record: {e}")))?;
        // A volume that no longer exists is exported nowhere.
        let Some(record) = record else {
            return Ok(FenceReport::NONE);
        };
        let method = self.backend.fencing_of(&record);
        match method {
            Fencing::None => Ok(FenceReport::NONE),
            Fencing::Bookkeeping => Ok(FenceReport {
                method,
                connections: Some(0),
            }),
            Fencing::Target => {
                let connections = self
                    .backend
                    .fence_node(volume, node)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                Ok(FenceReport {
                    method,
                    connections,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::backend::file::FileBackend;
    use crate::backend::{CapacityRange, CreateVolume, StoredCapability, MIB};
    use crate::capability::AccessMode;
    use crate::ids::VolumeName;
    use crate::params::VolumeParams;

    async fn volume(b: &FileBackend, name: &str, plane: &str) -> VolumeId {
        let params = HashMap::from([("dataPlane".to_owned(), plane.to_owned())]);
        b.create_volume(&CreateVolume {
            name: VolumeName::parse(name).unwrap(),
            capacity: CapacityRange {
                required: MIB,
                limit: 0,
            },
            capabilities: vec![StoredCapability {
                mode: AccessMode::MultiNodeMultiWriter,
                block: true,
            }],
            parameters: VolumeParams::try_from(&params).unwrap(),
            source: None,
            source_in_use: false,
        })
        .await
        .unwrap()
        .id
    }

    #[tokio::test]
    async fn an_nbd_volume_without_its_target_is_a_failed_fence_not_a_free_slot() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(FileBackend::open(dir.path()).unwrap());
        let on_file = volume(&files, "on-file", "file").await;
        let on_nbd = volume(&files, "on-nbd", "nbd").await;
        let fence = BackendFence::new(files);
        let node = NodeId::parse("node-a").unwrap();
        assert_eq!(
            fence.fence(&on_file, &node).await.unwrap(),
            FenceReport::NONE
        );
        let err = fence.fence(&on_nbd, &node).await.unwrap_err();
        assert!(err.reason.contains("serves no NBD target"), "{err}");
    }
}
