//! Generated CSI v1 protobuf types and gRPC service stubs.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("csi.v1");
