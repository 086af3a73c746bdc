//! The NBD plane as a backend: it wraps the backend that keeps the images and takes over
//! what differs for volumes created with `dataPlane: nbd` — their export (the target's
//! address and the attachment's signed export name) and their fence (the target drops
//! the node's connections and refuses it from then on). Everything else, and every
//! volume on the file plane, is the wrapped backend's.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::target::authority::ExportKey;
use super::target::fence::Fencer;
use crate::backend::{
    Backend, BackendError, Condition, CreateSnapshot, CreateVolume, Fencing, SnapshotRecord,
    VolumeRecord,
};
use crate::export::ExportInfo;
use crate::ids::{NodeId, SnapshotId, VolumeId};
use crate::params::DataPlane;

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

pub struct NbdPlaneBackend {
    inner: Arc<dyn Backend>,
    plane: Arc<NbdPlane>,
}

impl NbdPlaneBackend {
    pub fn new(inner: Arc<dyn Backend>, plane: Arc<NbdPlane>) -> Self {
        NbdPlaneBackend { inner, plane }
    }

    fn on_nbd(volume: &VolumeRecord) -> bool {
        volume.parameters.data_plane == DataPlane::Nbd
    }
}

#[async_trait]
impl Backend for NbdPlaneBackend {
    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeRecord, BackendError> {
        self.inner.create_volume(req).await
    }
    async fn delete_volume(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.inner.delete_volume(id).await
    }
    async fn get_volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, BackendError> {
        self.inner.get_volume(id).await
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, BackendError> {
        self.inner.list_volumes().await
    }
    async fn expand_volume(&self, id: &VolumeId, size: u64) -> Result<VolumeRecord, BackendError> {
        self.inner.expand_volume(id, size).await
    }

    async fn export(
        &self,
        volume: &VolumeRecord,
        node: &NodeId,
    ) -> Result<ExportInfo, BackendError> {
        // An NBD export is made for one attachment only (export_attachment).
        self.inner.export(volume, node).await
    }

    async fn export_attachment(
        &self,
        volume: &VolumeRecord,
        node: &NodeId,
        attached_at: DateTime<Utc>,
    ) -> Result<ExportInfo, BackendError> {
        if Self::on_nbd(volume) {
            return Ok(self.plane.export(&volume.id, node, attached_at));
        }
        self.inner
            .export_attachment(volume, node, attached_at)
            .await
    }

    fn serves(&self, plane: DataPlane) -> bool {
        plane == DataPlane::Nbd || self.inner.serves(plane)
    }

    /// The target can cut nodes off (for the NBD plane's volumes at least).
    fn fencing(&self) -> Fencing {
        Fencing::Target
    }

    fn fencing_of(&self, volume: &VolumeRecord) -> Fencing {
        if Self::on_nbd(volume) {
            Fencing::Target
        } else {
            self.inner.fencing_of(volume)
        }
    }

    /// The target admits exactly the attachments in the attachment state: nothing to add.
    async fn allow_node(&self, volume: &VolumeRecord, node: &NodeId) -> Result<(), BackendError> {
        if Self::on_nbd(volume) {
            return Ok(());
        }
        self.inner.allow_node(volume, node).await
    }

    async fn deny_node(&self, volume: &VolumeId, node: &NodeId) -> Result<(), BackendError> {
        self.fence_node(volume, node).await.map(drop)
    }

    async fn fence_node(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Option<usize>, BackendError> {
        // Fail closed: a record that cannot be read is no proof the volume is elsewhere.
        match self.inner.get_volume(volume).await? {
            Some(record) if !Self::on_nbd(&record) => self.inner.fence_node(volume, node).await,
            _ => self
                .plane
                .target
                .fence(volume, node)
                .await
                .map(Some)
                .map_err(|e| BackendError::Target(e.to_string())),
        }
    }

    async fn condition(&self, volume: &VolumeRecord) -> Result<Condition, BackendError> {
        self.inner.condition(volume).await
    }
    async fn available_capacity(&self) -> Result<u64, BackendError> {
        self.inner.available_capacity().await
    }
    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotRecord, BackendError> {
        self.inner.create_snapshot(req).await
    }
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        self.inner.delete_snapshot(id).await
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, BackendError> {
        self.inner.list_snapshots().await
    }
    async fn probe(&self) -> Result<(), BackendError> {
        self.inner.probe().await
    }
}
