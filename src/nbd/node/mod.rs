//! The node's side of the NBD plane: the client that negotiates an export, and the two
//! ways a node turns it into a block device — the kernel's nbd driver (netlink, with a
//! supervising process) or a FUSE disk under a loop device — and how those processes are
//! started (launch) and kept (keeper).

pub mod client;
pub mod fuse_disk;
pub mod keeper;
pub mod kernel;
pub mod launch;
pub mod netlink;
