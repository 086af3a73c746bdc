//! CSI Controller service: thin handlers over the backend and the AttachmentManager.

pub mod params;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use self::params::VolumeParams;
use crate::attachment::state::PublishRequest;
use crate::attachment::AttachmentManager;
use crate::backend::{Backend, CapacityRange, CreateVolume, StoredCapability, VolumeRecord};
use crate::capability::{self, Capability};
use crate::csi;
use crate::csi::controller_server::Controller;
use crate::error::Error;
use crate::ids::{IdError, NodeId, VolumeId, VolumeName};
use crate::locks::OperationLocks;
use crate::metrics::Metrics;
use crate::rpc::handle;

pub struct ControllerService {
    backend: Arc<dyn Backend>,
    attachments: Arc<AttachmentManager>,
    /// CreateVolume is serialised per name (the volume id does not exist yet).
    names: OperationLocks,
    metrics: Metrics,
}

impl ControllerService {
    pub fn new(
        backend: Arc<dyn Backend>,
        attachments: Arc<AttachmentManager>,
        metrics: Metrics,
    ) -> Self {
        ControllerService {
            backend,
            attachments,
            names: OperationLocks::new(),
            metrics,
        }
    }

    async fn existing_volume(&self, raw_id: &str) -> Result<VolumeRecord, Error> {
        let id = VolumeId::parse(raw_id)?;
        self.backend
            .get_volume(&id)
            .await?
            .ok_or(Error::VolumeNotFound(id))
    }

    fn to_csi_volume(volume: &VolumeRecord, params: &VolumeParams) -> csi::Volume {
        csi::Volume {
            capacity_bytes: volume.capacity_bytes as i64,
            volume_id: volume.id.to_string(),
            volume_context: params.volume_context(),
            ..Default::default()
        }
    }

    async fn create(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse, Error> {
        let name = VolumeName::parse(&req.name)?;
        let caps = capability::parse_all(&req.volume_capabilities)?;
        let capacity = CapacityRange::from_csi(req.capacity_range.as_ref())?;
        let params = VolumeParams::try_from(&req.parameters)?;
        if req.volume_content_source.is_some() {
            return Err(Error::InvalidField {
                field: "volume_content_source",
                reason: "creating a volume from a snapshot or another volume is not supported yet"
                    .into(),
            });
        }
        let _guard = self.names.try_lock(format!("name {name}"))?;
        let mut stored: Vec<StoredCapability> = caps.iter().map(StoredCapability::from).collect();
        stored.dedup();
        let volume = self
            .backend
            .create_volume(&CreateVolume {
                name,
                capacity,
                capabilities: stored,
                parameters: params.raw.clone(),
            })
            .await?;
        Ok(csi::CreateVolumeResponse {
            volume: Some(Self::to_csi_volume(&volume, &params)),
        })
    }

    async fn delete(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse, Error> {
        let id = match VolumeId::parse(&req.volume_id) {
            Ok(id) => id,
            // Never ours, so already "deleted": DeleteVolume is idempotent.
            Err(IdError::Unknown { .. }) => return Ok(csi::DeleteVolumeResponse {}),
            Err(e) => return Err(e.into()),
        };
        let _guard = self.attachments.lock_volume(&id)?;
        let nodes = self.attachments.attached_nodes(&id).await?;
        if !nodes.is_empty() {
            return Err(Error::VolumeInUse { volume: id, nodes });
        }
        self.backend.delete_volume(&id).await?;
        Ok(csi::DeleteVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse, Error> {
        let node_id = NodeId::parse(&req.node_id)?;
        let cap = capability::parse_one(req.volume_capability.as_ref())?;
        let volume = self.existing_volume(&req.volume_id).await?;
        if !volume.supports(&cap) {
            return Err(Error::CapabilityNotOffered {
                volume: volume.id,
                capability: format!("{:?}", StoredCapability::from(&cap)),
            });
        }
        let params = stored_params(&volume)?;
        self.attachments
            .publish(
                &volume.id,
                cap.mode.sharing(),
                params.migration_timeout,
                PublishRequest {
                    node_id,
                    readonly: req.readonly,
                },
            )
            .await?;
        let export = self.backend.export(&volume).await?;
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: export.to_publish_context(),
        })
    }

    async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse, Error> {
        let id = match VolumeId::parse(&req.volume_id) {
            Ok(id) => id,
            Err(IdError::Unknown { .. }) => return Ok(csi::ControllerUnpublishVolumeResponse {}),
            Err(e) => return Err(e.into()),
        };
        // An empty node_id means "from every node" (CSI spec).
        let nodes = if req.node_id.is_empty() {
            self.attachments.attached_nodes(&id).await?
        } else {
            vec![NodeId::parse(&req.node_id)?]
        };
        for node in nodes {
            self.attachments.unpublish(&id, &node).await?;
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    async fn unimplemented<T>(&self, method: &'static str) -> Result<Response<T>, Status> {
        handle(&self.metrics, method, "", "", async {
            Err(Error::Unimplemented(method))
        })
        .await
    }

    async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, Error> {
        let volume_id = VolumeId::parse(&req.volume_id)?;
        let caps = capability::parse_all(&req.volume_capabilities)?;
        let volume = self
            .backend
            .get_volume(&volume_id)
            .await?
            .ok_or(Error::VolumeNotFound(volume_id))?;
        let unsupported: Vec<&Capability> = caps.iter().filter(|c| !volume.supports(c)).collect();
        if !unsupported.is_empty() {
            return Ok(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: format!(
                    "volume was created with {:?}; not with {:?}",
                    volume.capabilities,
                    unsupported
                        .iter()
                        .map(|c| StoredCapability::from(*c))
                        .collect::<Vec<_>>()
                ),
            });
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                ..Default::default()
            }),
            message: String::new(),
        })
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

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type;
        handle(&self.metrics, "ControllerGetCapabilities", "", "", async {
            Ok(csi::ControllerGetCapabilitiesResponse {
                capabilities: [
                    Type::CreateDeleteVolume,
                    Type::PublishUnpublishVolume,
                    Type::PublishReadonly,
                ]
                .into_iter()
                .map(rpc_capability)
                .collect(),
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        _request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        self.unimplemented("ListVolumes").await
    }

    async fn get_capacity(
        &self,
        _request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        self.unimplemented("GetCapacity").await
    }

    async fn create_snapshot(
        &self,
        _request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        self.unimplemented("CreateSnapshot").await
    }

    async fn delete_snapshot(
        &self,
        _request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        self.unimplemented("DeleteSnapshot").await
    }

    async fn list_snapshots(
        &self,
        _request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        self.unimplemented("ListSnapshots").await
    }

    async fn controller_expand_volume(
        &self,
        _request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        self.unimplemented("ControllerExpandVolume").await
    }

    async fn controller_get_volume(
        &self,
        _request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        self.unimplemented("ControllerGetVolume").await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        self.unimplemented("ControllerModifyVolume").await
    }
}

/// The typed parameters of a stored volume (validated when it was created).
fn stored_params(volume: &VolumeRecord) -> Result<VolumeParams, Error> {
    let raw: std::collections::HashMap<String, String> =
        volume.parameters.clone().into_iter().collect();
    Ok(VolumeParams::try_from(&raw)?)
}
