//! Snapshot RPCs: CreateSnapshot, DeleteSnapshot, ListSnapshots.

use super::pagination::page;
use super::ControllerService;
use crate::backend::{CreateSnapshot, SnapshotRecord};
use crate::csi;
use crate::error::Error;
use crate::ids::{IdError, SnapshotId, VolumeId, VolumeName};

fn to_csi(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_at.timestamp(),
            nanos: s.created_at.timestamp_subsec_nanos() as i32,
        }),
        // Copies complete before the record exists: a listed snapshot is always usable.
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

impl ControllerService {
    pub(super) async fn create_snapshot_impl(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse, Error> {
        let name = VolumeName::parse(&req.name)?;
        let source = VolumeId::parse(&req.source_volume_id)?;
        if let Some((k, _)) = req
            .parameters
            .iter()
            .find(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Error::InvalidField {
                field: "parameters",
                reason: format!("snapshot parameter {k:?} is not known to this driver"),
            });
        }
        let _guard = self.attachments.lock_volume(&source)?;
        let in_use = !self.attachments.attached_nodes(&source).await?.is_empty();
        let snapshot = self
            .backend
            .create_snapshot(&CreateSnapshot {
                name,
                source,
                source_in_use: in_use,
            })
            .await?;
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(to_csi(&snapshot)),
        })
    }

    pub(super) async fn delete_snapshot_impl(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse, Error> {
        match SnapshotId::parse(&req.snapshot_id) {
            Ok(id) => {
                let _guard = self.names.try_lock(format!("snapshot {id}"))?;
                self.backend.delete_snapshot(&id).await?;
            }
            Err(IdError::Unknown { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    pub(super) async fn list_snapshots_impl(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Error> {
        let mut all = self.backend.list_snapshots().await?;
        // Filters by ids this driver never issued match nothing (not an error).
        if !req.snapshot_id.is_empty() {
            all.retain(|s| s.id.as_str() == req.snapshot_id);
        }
        if !req.source_volume_id.is_empty() {
            all.retain(|s| s.source_volume.as_str() == req.source_volume_id);
        }
        let (entries, next_token) = page(
            all,
            |s| s.id.as_str(),
            req.max_entries,
            &req.starting_token,
            |t| SnapshotId::parse(t).is_ok(),
        )?;
        Ok(csi::ListSnapshotsResponse {
            entries: entries
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(to_csi(s)),
                })
                .collect(),
            next_token,
        })
    }
}
