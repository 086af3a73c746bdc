//! CSI Controller service: thin handlers over the backend and the AttachmentManager.
//! The bodies live in `volumes.rs` and `snapshots.rs`; this file maps RPCs to them.

pub mod pagination;
mod snapshots;
pub mod volumes;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::attachment::AttachmentManager;
use crate::backend::Backend;
use crate::csi;
use crate::csi::controller_server::Controller;
use crate::error::Error;
use crate::locks::OperationLocks;
use crate::metrics::Metrics;
use crate::rpc::handle;

pub struct ControllerService {
    backend: Arc<dyn Backend>,
    attachments: Arc<AttachmentManager>,
    /// CreateVolume/CreateSnapshot are serialised per name (no id exists yet).
    names: OperationLocks,
    metrics: Metrics,
    topology_pool: String,
}

impl ControllerService {
    pub fn new(
        backend: Arc<dyn Backend>,
        attachments: Arc<AttachmentManager>,
        metrics: Metrics,
        topology_pool: String,
    ) -> Self {
        ControllerService {
            backend,
            attachments,
            names: OperationLocks::new(),
            metrics,
            topology_pool,
        }
    }

    async fn unimplemented<T>(&self, method: &'static str) -> Result<Response<T>, Status> {
        handle(&self.metrics, method, "", "", async {
            Err(Error::Unimplemented(method))
        })
        .await
    }
}

fn rpc_capability(
    t: csi::controller_service_capability::rpc::Type,
) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// Exactly what is implemented; ControllerModifyVolume is not (nothing to modify).
pub const CAPABILITIES: [csi::controller_service_capability::rpc::Type; 11] = {
    use csi::controller_service_capability::rpc::Type;
    [
        Type::CreateDeleteVolume,
        Type::PublishUnpublishVolume,
        Type::PublishReadonly,
        Type::ListVolumes,
        Type::ListVolumesPublishedNodes,
        Type::GetCapacity,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::CloneVolume,
        Type::ExpandVolume,
        Type::GetVolume,
    ]
};

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        handle(&self.metrics, "CreateVolume", &name, "", self.create(req)).await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(&self.metrics, "DeleteVolume", &id, "", self.delete(req)).await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let (id, node) = (req.volume_id.clone(), req.node_id.clone());
        handle(
            &self.metrics,
            "ControllerPublishVolume",
            &id,
            &node,
            self.publish(req),
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let (id, node) = (req.volume_id.clone(), req.node_id.clone());
        handle(
            &self.metrics,
            "ControllerUnpublishVolume",
            &id,
            &node,
            self.unpublish(req),
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "ValidateVolumeCapabilities",
            &id,
            "",
            self.validate(req),
        )
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        handle(
            &self.metrics,
            "ListVolumes",
            "",
            "",
            self.list(request.into_inner()),
        )
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        handle(
            &self.metrics,
            "GetCapacity",
            "",
            "",
            self.capacity(request.into_inner()),
        )
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        handle(&self.metrics, "ControllerGetCapabilities", "", "", async {
            Ok(csi::ControllerGetCapabilitiesResponse {
                capabilities: CAPABILITIES.into_iter().map(rpc_capability).collect(),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.source_volume_id.clone();
        handle(
            &self.metrics,
            "CreateSnapshot",
            &id,
            "",
            self.create_snapshot_impl(req),
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.snapshot_id.clone();
        handle(
            &self.metrics,
            "DeleteSnapshot",
            &id,
            "",
            self.delete_snapshot_impl(req),
        )
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        handle(
            &self.metrics,
            "ListSnapshots",
            "",
            "",
            self.list_snapshots_impl(request.into_inner()),
        )
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "ControllerExpandVolume",
            &id,
            "",
            self.expand(req),
        )
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(&self.metrics, "ControllerGetVolume", &id, "", self.get(req)).await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        self.unimplemented("ControllerModifyVolume").await
    }
}
