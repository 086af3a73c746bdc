//! Storage backends: where volume data lives and how a node reaches it.

pub mod file;
pub mod nvmet;
pub mod nvmet_file;
pub mod open;
pub mod rds;
pub mod routeros;
pub mod ssh;

use crate::params::{DataPlane, VolumeParams};
use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::capability::{AccessMode, Capability, Sharing};
use crate::export::ExportInfo;
use crate::ids::{NodeId, SnapshotId, VolumeId, VolumeName};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: u64 = GIB;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("volume {0} uses dataPlane nbd, but this controller serves no NBD target; start it with --nbd-listen (or --nbd-target)")]
    PlaneNotServed(VolumeId),
    #[error("volume name {name:?} already exists as {existing} with {difference}; choose another name or request the same parameters")]
    NameConflict {
        name: String,
        existing: VolumeId,
        difference: String,
    },
    #[error("{0}")]
    Capacity(#[from] CapacityError),
    #[error("cannot create a {requested} byte image: the filesystem holding the data dir refuses files that large")]
    TooLarge { requested: u64 },
    #[error("no space left in the data dir for volume {0}")]
    NoSpace(VolumeId),
    #[error("volume {0} does not exist")]
    NotFound(VolumeId),
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(SnapshotId),
    #[error("snapshot name {name:?} already exists as {existing} of volume {source_volume}; choose another name")]
    SnapshotNameConflict {
        name: String,
        existing: SnapshotId,
        source_volume: VolumeId,
    },
    #[error(
        "the requested size {requested} bytes is smaller than the source's {source_size} bytes"
    )]
    SmallerThanSource { requested: u64, source_size: u64 },
    #[error("volume {volume} can only grow: it has {current} bytes, {requested} requested")]
    Shrink {
        volume: VolumeId,
        current: u64,
        requested: u64,
    },
    #[error("volume {0} is in use and the data dir's filesystem cannot make an atomic copy (reflink); detach it first, or use btrfs or xfs with reflink=1 for crash-consistent snapshots of running volumes")]
    NotAtomic(VolumeId),
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume record {path:?} is unreadable: {source}")]
    CorruptRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("data dir {path:?} is not usable: {reason}")]
    Unhealthy { path: PathBuf, reason: String },
    /// The storage target (nvmet, RouterOS) could not do it now; worth retrying.
    #[error("storage target: {0}")]
    Target(String),
    /// The storage target refused for good (bad parameter, authentication, host key).
    #[error("storage target refused: {0}")]
    TargetRefused(String),
}

/// A capacity range from a request: 0 means "unspecified" for either bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    pub required: u64,
    pub limit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("capacity_range {field} is negative ({value})")]
    Negative { field: &'static str, value: i64 },
    #[error("capacity_range required_bytes {required} exceeds limit_bytes {limit}")]
    Inverted { required: u64, limit: u64 },
    #[error("capacity_range cannot be met: sizes are whole MiB, and no multiple of 1 MiB lies between required_bytes {required} and limit_bytes {limit}")]
    Unsatisfiable { required: u64, limit: u64 },
}

impl CapacityRange {
    pub fn from_csi(range: Option<&crate::csi::CapacityRange>) -> Result<Self, CapacityError> {
        let Some(r) = range else {
            return Ok(Self::default());
        };
        let non_negative = |field, value: i64| {
            u64::try_from(value).map_err(|_| CapacityError::Negative { field, value })
        };
        let range = CapacityRange {
            required: non_negative("required_bytes", r.required_bytes)?,
            limit: non_negative("limit_bytes", r.limit_bytes)?,
        };
        if range.limit != 0 && range.required > range.limit {
            return Err(CapacityError::Inverted {
                required: range.required,
                limit: range.limit,
            });
        }
        Ok(range)
    }

    /// The size to allocate: required rounded up to whole MiB (loop devices and
    /// filesystems want aligned sizes), or the default clamped to the limit.
    pub fn resolve(self) -> Result<u64, CapacityError> {
        let unsatisfiable = CapacityError::Unsatisfiable {
            required: self.required,
            limit: self.limit,
        };
        let size = if self.required == 0 {
            match self.limit {
                0 => DEFAULT_CAPACITY,
                limit => DEFAULT_CAPACITY.min(limit / MIB * MIB),
            }
        } else {
            self.required
                .checked_next_multiple_of(MIB)
                .ok_or(unsatisfiable.clone())?
        };
        if size == 0 || (self.limit != 0 && size > self.limit) || size > i64::MAX as u64 {
            return Err(unsatisfiable);
        }
        Ok(size)
    }

    pub fn contains(self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }
}

/// A capability as remembered with the volume: the mode and whether it is raw block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoredCapability {
    pub mode: AccessMode,
    pub block: bool,
}

impl From<&Capability> for StoredCapability {
    fn from(c: &Capability) -> Self {
        StoredCapability {
            mode: c.mode,
            block: c.is_block(),
        }
    }
}

/// Where a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

/// What CreateVolume asks a backend for, already validated.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: VolumeName,
    pub capacity: CapacityRange,
    pub capabilities: Vec<StoredCapability>,
    pub parameters: VolumeParams,
    pub source: Option<ContentSource>,
    /// The source volume is attached somewhere: its copy must be atomic.
    pub source_in_use: bool,
}

/// What CreateSnapshot asks for.
#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    pub name: VolumeName,
    pub source: VolumeId,
    pub source_in_use: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub name: String,
    pub source_volume: VolumeId,
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
}

impl SnapshotRecord {
    /// CSI idempotency: a repeated CreateSnapshot of the same name gets this snapshot back
    /// only if it is of the same source.
    pub fn reuse_for(self, req: &CreateSnapshot) -> Result<SnapshotRecord, BackendError> {
        if self.source_volume == req.source {
            Ok(self)
        } else {
            Err(BackendError::SnapshotNameConflict {
                name: req.name.to_string(),
                existing: self.id,
                source_volume: self.source_volume,
            })
        }
    }
}

/// Health of a volume's data as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// A volume as the backend knows it; persisted with the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub capabilities: Vec<StoredCapability>,
    pub parameters: VolumeParams,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
}

impl VolumeRecord {
    /// CSI idempotency: a repeated CreateVolume with the same name gets this volume back
    /// only if it is compatible with what is asked now; otherwise the reason.
    /// A repeated CreateVolume of the same name: this volume, or the conflict naming what
    /// differs.
    pub fn reuse_for(self, req: &CreateVolume) -> Result<VolumeRecord, BackendError> {
        match self.incompatibility(req) {
            None => Ok(self),
            Some(difference) => Err(BackendError::NameConflict {
                name: req.name.to_string(),
                existing: self.id,
                difference,
            }),
        }
    }

    pub fn incompatibility(&self, req: &CreateVolume) -> Option<String> {
        if !req.capacity.contains(self.capacity_bytes) {
            return Some(format!(
                "capacity {} bytes (requested required={} limit={})",
                self.capacity_bytes, req.capacity.required, req.capacity.limit
            ));
        }
        if !req
            .capabilities
            .iter()
            .all(|c| self.capabilities.contains(c))
        {
            return Some(format!(
                "capabilities {:?} (requested {:?})",
                self.capabilities, req.capabilities
            ));
        }
        if self.parameters != req.parameters {
            return Some(format!("parameters {:?}", self.parameters.raw));
        }
        if self.source != req.source {
            return Some(format!("content source {:?}", self.source));
        }
        None
    }

    /// The broadest sharing any of the volume's capabilities allows.
    pub fn sharing(&self) -> Sharing {
        let modes = self.capabilities.iter().map(|c| c.mode.sharing());
        modes
            .max_by_key(|s| match s {
                Sharing::Rwo => 0,
                Sharing::Rox => 1,
                Sharing::Rwx => 2,
            })
            .unwrap_or(Sharing::Rwo)
    }

    /// Whether `cap` is one of the capabilities the volume was created with.
    pub fn supports(&self, cap: &Capability) -> bool {
        self.capabilities.contains(&StoredCapability::from(cap))
    }
}

/// What cutting a node off achieves on a backend (ControllerUnpublish while the volume
/// stays attached elsewhere, as after a live migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fencing {
    /// Nothing to cut at a target: the node reaches the image through a filesystem.
    None,
    /// The target refuses the node and drops its live connections (NBD, nvmet ACLs).
    #[default]
    Target,
    /// Recorded only: the target has no host ACL (RouterOS), so a detached node that
    /// still has the device open could write until its kubelet tears the device down.
    Bookkeeping,
}

/// A storage backend. Implementations are idempotent and safe to call concurrently
/// for different volumes; the caller serialises calls for one volume or name.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Creates the volume, or returns the existing one of the same name if compatible.
    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeRecord, BackendError>;
    /// Deletes the volume; deleting an absent volume succeeds.
    async fn delete_volume(&self, id: &VolumeId) -> Result<(), BackendError>;
    async fn get_volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, BackendError>;
    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, BackendError>;
    /// Grows the volume to `size` bytes (already rounded); equal size is a no-op.
    async fn expand_volume(&self, id: &VolumeId, size: u64) -> Result<VolumeRecord, BackendError>;
    /// How `node` reaches the volume (goes into publish_context).
    async fn export(
        &self,
        volume: &VolumeRecord,
        node: &NodeId,
    ) -> Result<ExportInfo, BackendError>;
    /// How `node` reaches the volume under the attachment it got at `attached_at`:
    /// `export`, unless the plane derives something from the attachment (the NBD
    /// plane's per-attachment secret).
    async fn export_attachment(
        &self,
        volume: &VolumeRecord,
        node: &NodeId,
        _attached_at: DateTime<Utc>,
    ) -> Result<ExportInfo, BackendError> {
        self.export(volume, node).await
    }
    /// Whether volumes on `plane` can be published here.
    fn serves(&self, plane: DataPlane) -> bool {
        plane == DataPlane::File
    }
    /// What `deny_node` achieves here.
    fn fencing(&self) -> Fencing {
        Fencing::None
    }
    /// What `deny_node` achieves for this volume (a backend may serve several planes).
    fn fencing_of(&self, _volume: &VolumeRecord) -> Fencing {
        self.fencing()
    }
    /// Admits `node` at the target (after `export`); a no-op without host ACLs.
    async fn allow_node(&self, _volume: &VolumeRecord, _node: &NodeId) -> Result<(), BackendError> {
        Ok(())
    }
    /// Takes `node`'s access away and cuts its live connections; idempotent, and a
    /// no-op without host ACLs.
    async fn deny_node(&self, _volume: &VolumeId, _node: &NodeId) -> Result<(), BackendError> {
        Ok(())
    }
    /// `deny_node`, with the number of live connections it dropped where the target
    /// counts them.
    async fn fence_node(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<usize>, BackendError> {
        self.deny_node(volume, node).await.map(|()| None)
    }
    /// Whether the volume's data is where and what it should be.
    async fn condition(&self, volume: &VolumeRecord) -> Result<Condition, BackendError>;
    /// Bytes a new volume could use now.
    async fn available_capacity(&self) -> Result<u64, BackendError>;
    /// Creates a snapshot, or returns the existing one of the same name and source.
    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotRecord, BackendError>;
    /// Deletes a snapshot; deleting an absent one succeeds.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError>;
    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, BackendError>;
    /// Cheap health check for the Identity Probe.
    async fn probe(&self) -> Result<(), BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: u64, limit: u64) -> CapacityRange {
        CapacityRange { required, limit }
    }

    #[test]
    fn capacity_rounds_up_to_mib() {
        assert_eq!(range(1, 0).resolve().unwrap(), MIB);
        assert_eq!(range(MIB, 0).resolve().unwrap(), MIB);
        assert_eq!(range(MIB + 1, 0).resolve().unwrap(), 2 * MIB);
        assert_eq!(range(0, 0).resolve().unwrap(), DEFAULT_CAPACITY);
        assert_eq!(range(0, 10 * MIB + 5).resolve().unwrap(), 10 * MIB);
    }

    #[test]
    fn unsatisfiable_ranges_are_out_of_range() {
        assert!(matches!(
            range(MIB + 1, MIB + 100).resolve(),
            Err(CapacityError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            range(0, MIB - 1).resolve(),
            Err(CapacityError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            range(u64::MAX, 0).resolve(),
            Err(CapacityError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            range(i64::MAX as u64, 0).resolve(),
            Err(CapacityError::Unsatisfiable { .. })
        ));
    }

    #[test]
    fn csi_ranges_are_validated() {
        let r = |required_bytes, limit_bytes| crate::csi::CapacityRange {
            required_bytes,
            limit_bytes,
        };
        assert!(matches!(
            CapacityRange::from_csi(Some(&r(-1, 0))),
            Err(CapacityError::Negative { .. })
        ));
        assert!(matches!(
            CapacityRange::from_csi(Some(&r(10, 5))),
            Err(CapacityError::Inverted { .. })
        ));
        assert_eq!(
            CapacityRange::from_csi(None).unwrap(),
            CapacityRange::default()
        );
    }

    #[test]
    fn incompatibility_names_the_difference() {
        let cap = StoredCapability {
            mode: AccessMode::SingleNodeWriter,
            block: true,
        };
        let rec = VolumeRecord {
            id: VolumeId::generate(),
            name: "n".into(),
            capacity_bytes: 10 * MIB,
            capabilities: vec![cap],
            parameters: VolumeParams::default(),
            created_at: Utc::now(),
            source: None,
        };
        let mut req = CreateVolume {
            name: VolumeName::parse("n").unwrap(),
            capacity: range(10 * MIB, 0),
            capabilities: vec![cap],
            parameters: VolumeParams::default(),
            source: None,
            source_in_use: false,
        };
        assert_eq!(rec.incompatibility(&req), None);
        req.capacity = range(11 * MIB, 0);
        assert!(rec.incompatibility(&req).unwrap().contains("capacity"));
        req.capacity = range(0, 0);
        req.capabilities = vec![StoredCapability {
            mode: AccessMode::MultiNodeMultiWriter,
            block: true,
        }];
        assert!(rec.incompatibility(&req).unwrap().contains("capabilities"));
        req.capabilities = vec![cap];
        req.parameters = VolumeParams::try_from(&std::collections::HashMap::from([(
            "migrationTimeoutSeconds".to_owned(),
            "600".to_owned(),
        )]))
        .unwrap();
        assert!(rec.incompatibility(&req).unwrap().contains("parameters"));
    }
}
