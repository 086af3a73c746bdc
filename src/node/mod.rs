//! What a node does with a volume: transports that turn an export into a block device,
//! mounts and filesystems, and the stage/publish lifecycle over both (`NodeVolumes`).
//! The CSI Node service on top is `crate::service::node`.

pub mod command;
pub mod lifecycle;
pub mod mount;
pub mod mountinfo;
pub mod transport;
