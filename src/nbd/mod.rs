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
pub mod proto;
pub mod server;

use std::sync::Arc;

use chrono::{DateTime, Utc};

use self::authority::ExportKey;
use self::fence::Fencer;
use crate::export::ExportInfo;
use crate::ids::{NodeId, VolumeId};

/// What the controller needs of the NBD plane: where nodes dial, how export names are
/// signed, and the target to fence.
pub struct NbdPlane {
    /// The target to fence at: in this process, or on a storage host.
    pub target: Arc<dyn Fencer>,
    pub key: Arc<ExportKey>,
    /// host:port nodes connect to.
    pub advertise: String,
}

impl NbdPlane {
    /// What the node dials for this attachment; the export name carries its secret.
    pub fn export(
        &self,
        volume: &VolumeId,
        node: &NodeId,
        attached_at: DateTime<Utc>,
    ) -> ExportInfo {
        ExportInfo::Nbd {
            address: self.advertise.clone(),
            export: self.key.export_name(volume, node, attached_at),
        }
    }
}
