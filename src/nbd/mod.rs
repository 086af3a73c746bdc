//! The NBD data plane: a target serving the `file` backend's images over TCP to the
//! nodes a volume is published to, with per-attachment secrets and fencing.

pub mod authority;
pub mod client;
pub mod fence;
pub mod fuse_disk;
pub mod keeper;
pub mod kernel;
pub mod launch;
pub mod netlink;
pub mod plane;
pub mod proto;
pub mod server;

pub use plane::{NbdPlane, NbdPlaneBackend};
