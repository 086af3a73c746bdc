//! Kubernetes integration: watch caches, the PV-annotation AttachmentStore, the
//! Node/VolumeAttachment ClusterView and Events. Only built when
//! `--attachment-store kube` is chosen.

pub mod cache;
pub mod cluster;
pub mod events;
pub mod kubevirt;
pub mod lease;
pub mod pv_store;

pub const ANNOTATION_STATE: &str = "handoff.csi.dev/attachment";
pub const ANNOTATION_NODES: &str = "handoff.csi.dev/attached-nodes";
