//! Volume RPCs: create (empty, from a snapshot, or a clone), delete, publish, unpublish,
//! validate, expand, list, get and capacity.

use std::collections::HashMap;

use super::pagination::page;
use super::ControllerService;
use crate::attachment::state::PublishRequest;
use crate::backend::{
    BackendError, CapacityRange, ContentSource, CreateVolume, Fencing, StoredCapability,
    VolumeRecord,
};
use crate::capability::{self, Capability};
use crate::csi;
use crate::error::Error;
use crate::ids::{IdError, NodeId, SnapshotId, VolumeId, VolumeName};
use crate::params::{ParamError, VolumeParams, DATA_PLANE_KEY};
use crate::topology::TOPOLOGY_KEY;

fn content_source(src: &Option<csi::VolumeContentSource>) -> Result<Option<ContentSource>, Error> {
    use csi::volume_content_source::Type;
    match src.as_ref().and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Type::Snapshot(s)) => Ok(Some(ContentSource::Snapshot(SnapshotId::parse(
            &s.snapshot_id,
        )?))),
        Some(Type::Volume(v)) => Ok(Some(ContentSource::Volume(VolumeId::parse(&v.volume_id)?))),
    }
}

fn to_csi_source(src: &Option<ContentSource>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    src.as_ref().map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.to_string(),
            }),
        }),
    })
}

impl ControllerService {
    fn pool_topology(&self) -> csi::Topology {
        csi::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), self.topology_pool.clone())]),
        }
    }

    /// Whether `t` can be served from this controller's pool (segments it does not know
    /// are not ours to judge; a pool segment must match).
    fn topology_matches(&self, t: &csi::Topology) -> bool {
        t.segments
            .get(TOPOLOGY_KEY)
            .is_none_or(|p| *p == self.topology_pool)
    }

    fn check_topology(&self, req: Option<&csi::TopologyRequirement>) -> Result<(), Error> {
        let Some(req) = req else { return Ok(()) };
        let candidates = if req.requisite.is_empty() {
            &req.preferred
        } else {
            &req.requisite
        };
        if candidates.is_empty() || candidates.iter().any(|t| self.topology_matches(t)) {
            Ok(())
        } else {
            Err(Error::TopologyUnavailable {
                pool: self.topology_pool.clone(),
            })
        }
    }

    pub(super) fn to_csi_volume(&self, volume: &VolumeRecord) -> Result<csi::Volume, Error> {
        Ok(csi::Volume {
            capacity_bytes: volume.capacity_bytes as i64,
            volume_id: volume.id.to_string(),
            volume_context: volume.parameters.volume_context(),
            content_source: to_csi_source(&volume.source),
            accessible_topology: vec![self.pool_topology()],
        })
    }

    pub(super) async fn existing_volume(&self, raw_id: &str) -> Result<VolumeRecord, Error> {
        let id = VolumeId::parse(raw_id)?;
        self.backend
            .get_volume(&id)
            .await?
            .ok_or(Error::VolumeNotFound(id))
    }

    pub(super) async fn create(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse, Error> {
        let name = VolumeName::parse(&req.name)?;
        let caps = capability::parse_all(&req.volume_capabilities)?;
        let capacity = CapacityRange::from_csi(req.capacity_range.as_ref())?;
        let params = VolumeParams::try_from(&req.parameters)?;
        if !self.backend.serves(params.data_plane) {
            return Err(ParamError::Invalid {
                key: DATA_PLANE_KEY,
                value: "nbd".into(),
                reason: "this controller serves no NBD target; start it with --nbd-listen".into(),
            }
            .into());
        }
        let source = content_source(&req.volume_content_source)?;
        self.check_topology(req.accessibility_requirements.as_ref())?;
        let _guard = self.names.try_lock(format!("name {name}"))?;
        // A clone of a volume in use must be an atomic copy; hold the source still while
        // deciding so it cannot be attached in between.
        let (_source_guard, source_in_use) = match &source {
            Some(ContentSource::Volume(v)) => {
                let g = self.attachments.lock_volume(v)?;
                (
                    Some(g),
                    !self.attachments.attached_nodes(v).await?.is_empty(),
                )
            }
            _ => (None, false),
        };
        let mut stored: Vec<StoredCapability> = caps.iter().map(StoredCapability::from).collect();
        stored.dedup();
        let volume = self
            .backend
            .create_volume(&CreateVolume {
                name,
                capacity,
                capabilities: stored,
                parameters: params.clone(),
                source,
                source_in_use,
            })
            .await?;
        Ok(csi::CreateVolumeResponse {
            volume: Some(self.to_csi_volume(&volume)?),
        })
    }

    pub(super) async fn delete(
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

    pub(super) async fn publish(
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
        if !self.backend.serves(volume.parameters.data_plane) {
            return Err(BackendError::PlaneNotServed(volume.id).into());
        }
        // Attach decision and host ACL change together, so a concurrent unpublish
        // cannot deny a node this publish just admitted (it gets Aborted and retries).
        let _acl = self.acl_lock(&volume.id).await?;
        let request = PublishRequest {
            node_id,
            readonly: req.readonly,
            access: StoredCapability::from(&cap),
        };
        let export = self
            .attachments
            .publish_and_grant(self.backend.as_ref(), &volume, request)
            .await?;
        let publish_context = export.to_publish_context();
        Ok(csi::ControllerPublishVolumeResponse { publish_context })
    }

    pub(super) async fn unpublish(
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
        let _acl = self.acl_lock(&id).await?;
        for node in nodes {
            // The manager fences the node before it frees its slot.
            self.attachments.unpublish(&id, &node).await?;
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    /// Held across an attach decision and the matching host ACL change, where the
    /// backend has host ACLs.
    async fn acl_lock(&self, id: &VolumeId) -> Result<Option<crate::locks::OperationGuard>, Error> {
        if self.backend.fencing() != Fencing::Target {
            return Ok(None);
        }
        let key = format!("acl {id}");
        let wait = crate::attachment::CONTROLLER_LOCK_WAIT;
        Ok(Some(self.names.lock_within(key, wait).await?))
    }

    pub(super) async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, Error> {
        let volume = self.existing_volume(&req.volume_id).await?;
        let caps = capability::parse_all(&req.volume_capabilities)?;
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

    pub(super) async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Error> {
        let id = VolumeId::parse(&req.volume_id)?;
        let range = CapacityRange::from_csi(req.capacity_range.as_ref())?;
        if range.required == 0 && range.limit == 0 {
            return Err(IdError::Missing("capacity_range").into());
        }
        let size = range.resolve()?;
        let _guard = self.attachments.lock_volume(&id)?;
        let volume = self.backend.expand_volume(&id, size).await?;
        // The loop device on each node must re-read the image size (LOOP_SET_CAPACITY),
        // and a filesystem must grow: both are node steps, for block volumes too.
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: volume.capacity_bytes as i64,
            node_expansion_required: true,
        })
    }

    async fn status(
        &self,
        volume: &VolumeRecord,
    ) -> Result<(Vec<String>, csi::VolumeCondition), Error> {
        let nodes = self.attachments.attached_nodes(&volume.id).await?;
        let condition = self.backend.condition(volume).await?;
        Ok((
            nodes.iter().map(|n| n.to_string()).collect(),
            csi::VolumeCondition {
                abnormal: condition.abnormal,
                message: condition.message,
            },
        ))
    }

    pub(super) async fn list(
        &self,
        req: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse, Error> {
        let all = self.backend.list_volumes().await?;
        let (volumes, next_token) = page(
            all,
            |v| v.id.as_str(),
            req.max_entries,
            &req.starting_token,
            |t| VolumeId::parse(t).is_ok(),
        )?;
        let mut entries = Vec::with_capacity(volumes.len());
        for v in &volumes {
            let (published_node_ids, condition) = self.status(v).await?;
            entries.push(csi::list_volumes_response::Entry {
                volume: Some(self.to_csi_volume(v)?),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids,
                    volume_condition: Some(condition),
                }),
            });
        }
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    pub(super) async fn get(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse, Error> {
        let volume = self.existing_volume(&req.volume_id).await?;
        let (published_node_ids, condition) = self.status(&volume).await?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.to_csi_volume(&volume)?),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }

    pub(super) async fn capacity(
        &self,
        req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, Error> {
        VolumeParams::try_from(&req.parameters)?;
        for cap in &req.volume_capabilities {
            Capability::try_from(cap)?;
        }
        let servable = req
            .accessible_topology
            .as_ref()
            .is_none_or(|t| self.topology_matches(t));
        let available = if servable {
            self.backend.available_capacity().await?
        } else {
            0
        };
        Ok(csi::GetCapacityResponse {
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            ..Default::default()
        })
    }
}
