//! handoff-csi: a Kubernetes CSI block-storage driver whose centrepiece is safe attach
//! tracking for KubeVirt live migration.
//!
//! Layout: gRPC handlers (`identity`, `controller`, `node`) are thin; the rules live in
//! `attachment` (who may hold a volume), `backend` (where data lives) and `node`
//! (devices and mounts). Real implementations of every seam are built in `main.rs`.

pub mod attachment;
pub mod backend;
pub mod blocking;
pub mod capability;
pub mod client;
pub mod config;
pub mod controller;
pub mod csi;
pub mod datacheck;
pub mod demo;
pub mod durable;
pub mod error;
pub mod export;
pub mod identity;
pub mod ids;
pub mod kube;
pub mod lab;
pub mod locks;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod params;
pub mod registry;
pub mod rpc;
pub mod server;
pub mod service;
pub mod topology;
