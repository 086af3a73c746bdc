//! The NBD data plane: a target serving the `file` backend's images over TCP to the
//! nodes a volume is published to, with per-attachment secrets and fencing.
//!
//! - `proto`: the wire format both sides speak.
//! - `plane`: the controller's side, a Backend wrapping the image backend.
//! - `target`: the NBD server, the authority that admits attachments, the fence.
//! - `node`: the client, the kernel's nbd driver over netlink or a FUSE disk, and the
//!   processes that carry them (launch, keeper).

pub mod node;
pub mod plane;
pub mod proto;
pub mod target;

pub use plane::{NbdPlane, NbdPlaneBackend};
