//! The NBD data plane: a target serving the `file` backend's images over TCP to the
//! nodes a volume is published to, with per-attachment secrets and fencing.

pub mod authority;
pub mod client;
pub mod fuse_disk;
pub mod proto;
pub mod server;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use self::authority::ExportKey;
use self::server::NbdTarget;
use crate::ids::{NodeId, VolumeId};

/// publish_context keys a node uses to reach the NBD export of its attachment.
pub const CTX_NBD_ADDRESS: &str = "nbdAddress";
pub const CTX_NBD_EXPORT: &str = "nbdExport";

/// What the controller needs of the NBD plane: where nodes dial, how export names are
/// signed, and the target to fence.
pub struct NbdPlane {
    pub target: Arc<NbdTarget>,
    pub key: Arc<ExportKey>,
    /// host:port nodes connect to.
    pub advertise: String,
}

impl NbdPlane {
    /// Adds the address and this attachment's export name (which carries its secret).
    pub fn add_to_publish_context(
        &self,
        ctx: &mut HashMap<String, String>,
        volume: &VolumeId,
        node: &NodeId,
        attached_at: DateTime<Utc>,
    ) {
        ctx.insert(CTX_NBD_ADDRESS.into(), self.advertise.clone());
        ctx.insert(
            CTX_NBD_EXPORT.into(),
            self.key.export_name(volume, node, attached_at),
        );
    }
}
