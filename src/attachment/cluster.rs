//! What the cluster knows about nodes and attachments. Without Kubernetes nothing is
//! known (every well-formed node id is accepted); with it, Node and VolumeAttachment
//! objects answer (from watch caches, not a LIST per call).

use std::collections::HashMap;

use async_trait::async_trait;

use super::state::{MigrationPhase, MigrationRef, Workload};
use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};

#[derive(Debug, thiserror::Error)]
#[error("cluster view unavailable: {0}")]
pub struct ClusterError(pub String);

/// One VolumeAttachment of this driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentObject {
    pub volume: VolumeId,
    pub node: NodeId,
    /// status.attached: the attacher saw ControllerPublish succeed.
    pub attached: bool,
    /// When the object was created: the order nodes joined in.
    pub created: Option<chrono::DateTime<chrono::Utc>>,
}

/// VolumeAttachments grouped by volume.
pub type AttachmentIndex = HashMap<VolumeId, Vec<AttachmentObject>>;

pub fn index(objects: Vec<AttachmentObject>) -> AttachmentIndex {
    let mut idx: AttachmentIndex = HashMap::new();
    for o in objects {
        idx.entry(o.volume.clone()).or_default().push(o);
    }
    idx
}

#[async_trait]
pub trait ClusterView: Send + Sync + 'static {
    /// Which of these nodes no longer exist in the cluster.
    async fn gone_nodes(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError>;
    /// Whether a node a publish names is known to exist: `Some(false)` refuses it with
    /// NotFound (and the message), `None` when this view cannot tell.
    async fn node_known(&self, _node: &NodeId) -> Result<NodeKnown, ClusterError> {
        Ok(NodeKnown::CannotTell)
    }
    /// Every VolumeAttachment of this driver, or `None` when the cluster cannot say.
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError>;
    /// The same, read from the source of truth now (not a watch cache that may lag or
    /// be stuck): what a holder may be cleared on.
    async fn confirmed_attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        self.attachments().await
    }
    /// Who uses the volume, asked when `target` would become its second node while
    /// `holder` has it: the VMI and its running migration, and (when `check_pods`) the
    /// pods using its claim that do not belong to that VM.
    async fn workload(
        &self,
        _volume: &VolumeId,
        _holder: &NodeId,
        _target: &NodeId,
        _check_pods: bool,
    ) -> Result<Workload, ClusterError> {
        Ok(Workload::default())
    }
    /// How many nodes the volume's PersistentVolume lets share it (its access modes and
    /// volume mode); `None` when unknown.
    async fn sharing_of(&self, _volume: &VolumeId) -> Result<Option<Sharing>, ClusterError> {
        Ok(None)
    }
    /// The clock of a matched migration as the cluster shows it now (KubeVirt publishes
    /// its configuration and start time after the attach); `None` when unknown.
    async fn migration_clock(
        &self,
        _migration: &MigrationRef,
    ) -> Result<Option<super::deadline::MigrationClock>, ClusterError> {
        Ok(None)
    }
    /// The phase of a migration object; `None` when it is gone or nothing is known.
    async fn migration_phase(
        &self,
        _migration: &MigrationRef,
    ) -> Result<Option<MigrationPhase>, ClusterError> {
        Ok(None)
    }
}

/// What a cluster view can say about a node a publish names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKnown {
    Yes,
    /// Unknown, with what a person should check.
    No(String),
    CannotTell,
}

/// Without Kubernetes: the nodes whose plugins registered (see `registry`).
#[derive(Debug, Clone)]
pub struct RegisteredNodes(pub crate::registry::NodeRegistry);

#[async_trait]
impl ClusterView for RegisteredNodes {
    async fn gone_nodes(&self, _nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        Ok(Vec::new())
    }
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        Ok(None)
    }
    async fn node_known(&self, node: &NodeId) -> Result<NodeKnown, ClusterError> {
        let dir = self.0.dir().display().to_string();
        match self.0.knows(node) {
            Ok(true) => Ok(NodeKnown::Yes),
            Ok(false) => Ok(NodeKnown::No(format!(
                "no node plugin registered node id {node} in {dir} (node plugins register there at start-up and at NodeGetInfo; without Kubernetes they must share --node-registry with the controller)"
            ))),
            Err(e) => Err(ClusterError(format!("reading the node registry {dir}: {e}"))),
        }
    }
}

/// No cluster and no registry: no node is ever known to be gone.
#[derive(Debug, Default, Clone)]
pub struct Standalone;

#[async_trait]
impl ClusterView for Standalone {
    async fn gone_nodes(&self, _nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        Ok(Vec::new())
    }
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        Ok(None)
    }
}
