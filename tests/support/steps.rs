//! The CSI call sequences Kubernetes makes for one node of a LocalCluster
//! (ControllerPublish → NodeStage → NodePublish, and back), for RWX block volumes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;

use super::{block_cap, publish_request, LocalCluster};

fn rwx() -> csi::VolumeCapability {
    block_cap(Mode::MultiNodeMultiWriter)
}

/// The CSI calls Kubernetes makes for one node, with that node's paths.
pub struct Attached {
    pub node: String,
    pub staging: PathBuf,
    pub target: PathBuf,
}

pub async fn attach(cluster: &LocalCluster, id: &str, node: &str) -> Attached {
    let ctx: HashMap<String, String> = cluster
        .controller
        .controller()
        .await
        .controller_publish_volume(publish_request(id, node, rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let d = cluster.node(node);
    let (staging, target) = (d.path("staging"), d.path("vm-disk"));
    let mut n = d.node().await;
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
    Attached {
        node: node.into(),
        staging,
        target,
    }
}

pub async fn detach(cluster: &LocalCluster, id: &str, a: &Attached) {
    let mut n = cluster.node(&a.node).node().await;
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: a.target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: a.staging.display().to_string(),
    })
    .await
    .unwrap();
    cluster
        .controller
        .controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: a.node.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// An RWX block volume of `bytes` on the NBD plane (the controller serves the target).
pub async fn nbd_disk(cluster: &LocalCluster, name: &str, bytes: i64) -> String {
    disk(cluster, name, bytes, "nbd").await
}

/// An RWX block volume of `bytes` on data plane `plane` (`file` or `nbd`).
pub async fn disk(cluster: &LocalCluster, name: &str, bytes: i64, plane: &str) -> String {
    let mut req = super::create_request(name, bytes, rwx());
    req.parameters.insert("dataPlane".into(), plane.into());
    cluster
        .controller
        .controller()
        .await
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}
