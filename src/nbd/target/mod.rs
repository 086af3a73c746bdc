//! The NBD target: serves published volumes' images to the attachments the authority
//! admits, and drops a node's connections when it is fenced (in process, or on a
//! storage host over signed HTTP).

pub mod authority;
pub mod fence;
pub mod server;
