//! The CSI gRPC services over the domain rooms: thin handlers that validate, make one
//! call and map the result (`crate::rpc::handle`). The Controller service lives in
//! `crate::controller`, Identity in `crate::identity`.

pub mod node;
