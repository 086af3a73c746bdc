//! CSI Node service: thin handlers over `NodeVolumes`.

use std::path::{Component, Path, PathBuf};

use tonic::{Request, Response, Status};

use crate::capability;
use crate::csi;
use crate::csi::node_server::Node;
use crate::error::Error;
use crate::export::ExportInfo;
use crate::ids::{IdError, NodeId, VolumeId};
use crate::metrics::Metrics;
use crate::node::lifecycle::NodeVolumes;
use crate::node::mount::VolumeStats;
use crate::rpc::handle;

pub struct NodeService {
    node_id: NodeId,
    volumes: NodeVolumes,
    metrics: Metrics,
    topology_pool: String,
    /// Canonical kubelet directory: every staging/target path must be inside it.
    kubelet_dir: PathBuf,
    registry: Option<crate::registry::NodeRegistry>,
}

/// Paths from the CO are absolute, without `..` or NUL, and inside the kubelet directory
/// (also after resolving symlinks): checked before any syscall, so a bad request can never
/// unmount or remove anything else on the host.
/// A required string field, before anything is looked up by it.
fn required<'a>(field: &'static str, raw: &'a str) -> Result<&'a str, Error> {
    if raw.is_empty() {
        return Err(IdError::Missing(field).into());
    }
    Ok(raw)
}

/// The `volume_path` of NodeGetVolumeStats and NodeExpandVolume: required, and a path
/// that cannot hold one of our volumes (relative, outside the kubelet dir) is CSI's
/// "volume does not exist on the specified path" (NotFound). Nothing is touched there.
fn volume_path(raw_id: &str, raw: &str, root: &Path) -> Result<PathBuf, Error> {
    match host_path("volume_path", raw, root) {
        Err(Error::InvalidField { reason, .. }) => {
            Err(Error::Node(crate::node::lifecycle::NodeError::NotAtPath {
                volume: raw_id.to_owned(),
                path: raw.to_owned(),
                reason,
            }))
        }
        other => other,
    }
}

fn host_path(field: &'static str, raw: &str, root: &Path) -> Result<PathBuf, Error> {
    let invalid = |reason: &str| Error::InvalidField {
        field,
        reason: reason.into(),
    };
    if raw.is_empty() {
        return Err(IdError::Missing(field).into());
    }
    if raw.len() > 4096 || raw.contains('\0') {
        return Err(invalid("must be a path of at most 4096 bytes without NUL"));
    }
    let path = Path::new(raw);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("must be an absolute path without '..'"));
    }
    let outside = || Error::InvalidField {
        field,
        reason: format!(
            "must be under the kubelet directory {} (--kubelet-dir), also after resolving symlinks",
            root.display()
        ),
    };
    if !path.starts_with(root) {
        return Err(outside());
    }
    // Component by component below the root: every prefix that exists must resolve
    // under the root, so no symlink (to an ancestor or elsewhere) leads out.
    let mut prefix = root.to_path_buf();
    for part in path.strip_prefix(root).map_err(|_| outside())?.components() {
        prefix.push(part);
        match std::fs::canonicalize(&prefix) {
            Ok(resolved) if resolved.starts_with(root) => {}
            Ok(_) => return Err(outside()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => {
                return Err(invalid(&format!(
                    "cannot resolve {}: {e}",
                    prefix.display()
                )))
            }
        }
    }
    Ok(path.to_path_buf())
}

/// Unknown volume ids are "nothing to undo" for unstage/unpublish.
fn volume_or_nothing(raw: &str) -> Result<Option<VolumeId>, Error> {
    match VolumeId::parse(raw) {
        Ok(id) => Ok(Some(id)),
        Err(IdError::Unknown { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn usage(unit: csi::volume_usage::Unit, total: u64, available: u64, used: u64) -> csi::VolumeUsage {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    csi::VolumeUsage {
        total: clamp(total),
        available: clamp(available),
        used: clamp(used),
        unit: unit as i32,
    }
}

impl NodeService {
    pub fn new(
        node_id: NodeId,
        volumes: NodeVolumes,
        metrics: Metrics,
        topology_pool: String,
        kubelet_dir: &Path,
    ) -> Self {
        NodeService {
            node_id,
            volumes,
            metrics,
            topology_pool,
            kubelet_dir: std::fs::canonicalize(kubelet_dir)
                .unwrap_or_else(|_| kubelet_dir.to_path_buf()),
            registry: None,
        }
    }

    /// Without Kubernetes, NodeGetInfo (kubelet's registration call) registers the node
    /// again, so a wiped registry heals.
    pub fn with_registry(mut self, registry: Option<crate::registry::NodeRegistry>) -> Self {
        self.registry = registry;
        self
    }

    async fn expand(
        &self,
        req: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse, Error> {
        let raw_id = required("volume_id", &req.volume_id)?;
        let path = volume_path(raw_id, &req.volume_path, &self.kubelet_dir)?;
        let volume = VolumeId::parse(raw_id)?;
        if !path.exists() {
            return Err(Error::Node(
                crate::node::lifecycle::NodeError::PathNotFound { path },
            ));
        }
        let size = self.volumes.expand(&volume, &path).await?;
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        })
    }

    async fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse, Error> {
        // Required fields first, then the id (CSI: InvalidArgument before NotFound).
        let raw_id = required("volume_id", &req.volume_id)?;
        let staging = host_path(
            "staging_target_path",
            &req.staging_target_path,
            &self.kubelet_dir,
        )?;
        let cap = capability::parse_one(req.volume_capability.as_ref())?;
        let volume = VolumeId::parse(raw_id)?;
        let export = ExportInfo::from_publish_context(&req.publish_context)?;
        self.volumes.stage(&volume, &export, &staging, &cap).await?;
        Ok(csi::NodeStageVolumeResponse {})
    }

    async fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse, Error> {
        let volume = volume_or_nothing(&req.volume_id)?;
        let staging = host_path(
            "staging_target_path",
            &req.staging_target_path,
            &self.kubelet_dir,
        )?;
        if let Some(volume) = volume {
            self.volumes.unstage(&volume, &staging).await?;
        }
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse, Error> {
        let raw_id = required("volume_id", &req.volume_id)?;
        let staging = host_path(
            "staging_target_path",
            &req.staging_target_path,
            &self.kubelet_dir,
        )?;
        let target = host_path("target_path", &req.target_path, &self.kubelet_dir)?;
        let cap = capability::parse_one(req.volume_capability.as_ref())?;
        let volume = VolumeId::parse(raw_id)?;
        self.volumes
            .publish(&volume, &staging, &target, &cap, req.readonly)
            .await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse, Error> {
        let volume = volume_or_nothing(&req.volume_id)?;
        let target = host_path("target_path", &req.target_path, &self.kubelet_dir)?;
        if let Some(volume) = volume {
            self.volumes.unpublish(&volume, &target).await?;
        }
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Error> {
        use csi::volume_usage::Unit;
        let raw_id = required("volume_id", &req.volume_id)?;
        let path = volume_path(raw_id, &req.volume_path, &self.kubelet_dir)?;
        let volume = VolumeId::parse(raw_id)?;
        let (stats, condition) = self.volumes.stats(&volume, &path).await?;
        let usage = match stats {
            VolumeStats::Block { total_bytes } => vec![usage(Unit::Bytes, total_bytes, 0, 0)],
            VolumeStats::Filesystem {
                total_bytes,
                available_bytes,
                used_bytes,
                total_inodes,
                available_inodes,
                used_inodes,
            } => vec![
                usage(Unit::Bytes, total_bytes, available_bytes, used_bytes),
                usage(Unit::Inodes, total_inodes, available_inodes, used_inodes),
            ],
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: condition.abnormal,
                message: condition.message,
            }),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "NodeStageVolume",
            &id,
            self.node_id.as_str(),
            self.stage(req),
        )
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "NodeUnstageVolume",
            &id,
            self.node_id.as_str(),
            self.unstage(req),
        )
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "NodePublishVolume",
            &id,
            self.node_id.as_str(),
            self.publish(req),
        )
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "NodeUnpublishVolume",
            &id,
            self.node_id.as_str(),
            self.unpublish(req),
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "NodeGetVolumeStats",
            &id,
            self.node_id.as_str(),
            self.stats(req),
        )
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        handle(
            &self.metrics,
            "NodeExpandVolume",
            &id,
            self.node_id.as_str(),
            self.expand(req),
        )
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as CapType};
        handle(
            &self.metrics,
            "NodeGetCapabilities",
            "",
            self.node_id.as_str(),
            async {
                Ok(csi::NodeGetCapabilitiesResponse {
                    capabilities: [
                        Type::StageUnstageVolume,
                        Type::GetVolumeStats,
                        Type::VolumeCondition,
                        Type::ExpandVolume,
                    ]
                    .into_iter()
                    .map(|t| csi::NodeServiceCapability {
                        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
                    })
                    .collect(),
                })
            },
        )
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        handle(
            &self.metrics,
            "NodeGetInfo",
            "",
            self.node_id.as_str(),
            async {
                if let Some(registry) = &self.registry {
                    if let Err(e) = registry.register(&self.node_id) {
                        tracing::warn!(node = %self.node_id, dir = %registry.dir().display(), error = %e, "could not register this node; the controller will refuse to publish to it");
                    }
                }
                Ok(csi::NodeGetInfoResponse {
                    node_id: self.node_id.to_string(),
                    max_volumes_per_node: 0,
                    accessible_topology: Some(csi::Topology {
                        segments: [(
                            crate::topology::TOPOLOGY_KEY.to_owned(),
                            self.topology_pool.clone(),
                        )]
                        .into(),
                    }),
                })
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_checked() {
        let root = Path::new("/var/lib/kubelet");
        assert!(host_path("target_path", "/var/lib/kubelet/pods/x/vol", root).is_ok());
        for bad in [
            "relative/path",
            "/a/../etc",
            "/a\0b",
            "",
            "/etc",
            "/",
            "/var/lib/kubeletx/y",
        ] {
            assert!(host_path("target_path", bad, root).is_err(), "{bad:?}");
        }
        // A symlink inside the root that points outside is refused.
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        assert!(host_path(
            "target_path",
            &format!("{}/escape/x", root.display()),
            &root
        )
        .is_err());
        assert!(host_path("target_path", &format!("{}/fine/x", root.display()), &root).is_ok());
        // Issue 15 case 20: a symlink to an ancestor of the root (here "/") is refused,
        // itself and everything below it, existing or not.
        std::os::unix::fs::symlink("/", root.join("up")).unwrap();
        let parent = root.parent().unwrap().display().to_string();
        std::os::unix::fs::symlink(&parent, root.join("up-one")).unwrap();
        for bad in ["up", "up/x", "up/etc/new-dir", "up-one", "up-one/y"] {
            assert!(
                host_path("target_path", &format!("{}/{bad}", root.display()), &root).is_err(),
                "{bad}"
            );
        }
        // A symlink that stays inside is fine.
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("inside")).unwrap();
        assert!(host_path(
            "target_path",
            &format!("{}/inside/x", root.display()),
            &root
        )
        .is_ok());
    }
}
