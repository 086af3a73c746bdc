//! The topology this driver reports: nodes that reach the same data dir share a pool.

/// The segment key of a node's (and a volume's) pool.
pub const TOPOLOGY_KEY: &str = "topology.handoff.csi.dev/pool";
