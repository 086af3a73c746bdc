//! Privileged end-to-end tests over the real socket: real loop devices, mkfs, mounts.
//! Each test cleans up through the harness even when it fails.

mod support;

use std::path::Path;

use handoff_csi::csi;
use handoff_csi::csi::controller_client::ControllerClient;
use handoff_csi::csi::node_client::NodeClient;
use handoff_csi::datacheck;
use support::*;
use tonic::transport::Channel;
use tonic::Code;

struct Volume {
    id: String,
    publish_context: std::collections::HashMap<String, String>,
}

async fn create_and_publish(
    c: &mut ControllerClient<Channel>,
    name: &str,
    bytes: i64,
    cap: &csi::VolumeCapability,
) -> Volume {
    let id = c
        .create_volume(create_request(name, bytes, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let publish_context = c
        .controller_publish_volume(publish_request(&id, "node-a", cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    Volume {
        id,
        publish_context,
    }
}

fn stage_req(
    v: &Volume,
    staging: &Path,
    cap: &csi::VolumeCapability,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        publish_context: v.publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

fn publish_req(
    v: &Volume,
    staging: &Path,
    target: &Path,
    cap: &csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        publish_context: v.publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        readonly,
        ..Default::default()
    }
}

async fn unpublish(n: &mut NodeClient<Channel>, v: &Volume, target: &Path) {
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
}

async fn unstage(
    n: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
) -> Result<(), tonic::Status> {
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .map(drop)
}

async fn teardown(c: &mut ControllerClient<Channel>, v: &Volume) {
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn dio_flag(device_name: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/{device_name}/loop/dio"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn block_volume_full_lifecycle() {
    if !require_root("block_volume_full_lifecycle") {
        return;
    }
    let d = Driver::start().await;
    let root = std::fs::canonicalize(d.dir.path()).unwrap();
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let cap = rwo_block();
    let v = create_and_publish(&mut c, "blk", 64 * MIB, &cap).await;
    let (staging, target) = (d.path("staging"), d.path("target-dev"));
    std::fs::create_dir_all(&staging).unwrap();
    for _ in 0..2 {
        n.node_stage_volume(stage_req(&v, &staging, &cap))
            .await
            .unwrap();
    }
    let loops = loops_under(&root);
    assert_eq!(
        loops.len(),
        1,
        "exactly one loop device, also after a repeated stage"
    );
    let name = loops[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(dio_flag(&name), "1", "loop device must use direct I/O");
    for _ in 0..2 {
        n.node_publish_volume(publish_req(&v, &staging, &target, &cap, false))
            .await
            .unwrap();
    }
    assert_eq!(mounts_under(&root).len(), 1, "one bind mount, not stacked");

    // Write 4 MiB of checksummed blocks with O_DIRECT through the published device.
    let dev = datacheck::open_direct(&target, true).unwrap();
    datacheck::write_blocks(&dev, 0, 1024, 7).unwrap();
    assert_eq!(datacheck::verify_blocks(&dev, &[7; 1024]), Ok(1024));
    drop(dev);

    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 1);
    assert_eq!(stats.usage[0].total, 64 * MIB);
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Unstage under a live publish would pull the disk from a running VM: refused.
    assert_eq!(
        code(unstage(&mut n, &v, &staging).await),
        Code::FailedPrecondition
    );
    assert_eq!(loops_under(&root).len(), 1);

    for _ in 0..2 {
        unpublish(&mut n, &v, &target).await;
    }
    assert!(!target.exists());
    for _ in 0..2 {
        unstage(&mut n, &v, &staging).await.unwrap();
    }
    assert!(loops_under(&root).is_empty(), "loop device detached");
    assert!(mounts_under(&root).is_empty());

    // The data is in the image: a fresh stage reads it back.
    n.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, &cap, false))
        .await
        .unwrap();
    let dev = datacheck::open_direct(&target, false).unwrap();
    assert_eq!(datacheck::verify_blocks(&dev, &[7; 1024]), Ok(1024));
    drop(dev);
    unpublish(&mut n, &v, &target).await;
    unstage(&mut n, &v, &staging).await.unwrap();
    teardown(&mut c, &v).await;
    assert_eq!(
        std::fs::read_dir(d.data_dir().join("volumes"))
            .unwrap()
            .count(),
        0
    );
}

async fn mount_lifecycle(fs: &str) {
    let d = Driver::start().await;
    let root = std::fs::canonicalize(d.dir.path()).unwrap();
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let cap = rwo_mount(fs);
    let v = create_and_publish(&mut c, &format!("fs-{fs}"), 320 * MIB, &cap).await;
    let (staging, target) = (d.path("staging"), d.path("target"));
    for _ in 0..2 {
        n.node_stage_volume(stage_req(&v, &staging, &cap))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        n.node_publish_volume(publish_req(&v, &staging, &target, &cap, false))
            .await
            .unwrap();
    }
    let file = target.join("hello.txt");
    std::fs::write(&file, b"written through the published path").unwrap();
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"written through the published path"
    );
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    assert!(stats.usage[0].total > 250 * MIB && stats.usage[0].total <= 320 * MIB);
    assert!(stats.usage[1].used > 0);

    // A read-only publish of the same staged filesystem refuses writes.
    let ro_target = d.path("target-ro");
    n.node_publish_volume(publish_req(&v, &staging, &ro_target, &cap, true))
        .await
        .unwrap();
    let err = std::fs::write(ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(ro_target.join("hello.txt").exists());
    unpublish(&mut n, &v, &ro_target).await;

    unpublish(&mut n, &v, &target).await;
    unpublish(&mut n, &v, &target).await;
    for _ in 0..2 {
        unstage(&mut n, &v, &staging).await.unwrap();
    }
    assert!(mounts_under(&root).is_empty());
    assert!(loops_under(&root).is_empty());

    // Staged again: the existing filesystem is mounted, never reformatted.
    n.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    assert!(staging.join("hello.txt").exists(), "data survived restage");
    unstage(&mut n, &v, &staging).await.unwrap();

    // Asking for another filesystem type is refused; the data stays.
    let other = rwo_mount(if fs == "ext4" { "xfs" } else { "ext4" });
    let status = n
        .node_stage_volume(stage_req(&v, &staging, &other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("never reformatted"),
        "{}",
        status.message()
    );
    n.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    assert!(staging.join("hello.txt").exists());
    unstage(&mut n, &v, &staging).await.unwrap();
    teardown(&mut c, &v).await;
}

#[tokio::test]
async fn ext4_volume_full_lifecycle() {
    if require_root("ext4_volume_full_lifecycle") {
        mount_lifecycle("ext4").await;
    }
}

#[tokio::test]
async fn xfs_volume_full_lifecycle() {
    if require_root("xfs_volume_full_lifecycle") {
        mount_lifecycle("xfs").await;
    }
}

#[tokio::test]
async fn node_plugin_restart_finds_its_devices_again() {
    if !require_root("node_plugin_restart_finds_its_devices_again") {
        return;
    }
    let mut d = Driver::start().await;
    let root = std::fs::canonicalize(d.dir.path()).unwrap();
    let cap = rwo_mount("ext4");
    let v = create_and_publish(&mut d.controller().await, "restart", 64 * MIB, &cap).await;
    let (staging, target) = (d.path("staging"), d.path("target"));
    let mut n = d.node().await;
    n.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, &cap, false))
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"kept").unwrap();

    d.crash_and_restart().await;
    let mut n = d.node().await;
    // Idempotent after restart: no second loop device, no stacked mount.
    n.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, &cap, false))
        .await
        .unwrap();
    assert_eq!(loops_under(&root).len(), 1);
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"kept");
    unpublish(&mut n, &v, &target).await;
    unstage(&mut n, &v, &staging).await.unwrap();
    assert!(loops_under(&root).is_empty());
    assert!(mounts_under(&root).is_empty());
    teardown(&mut d.controller().await, &v).await;
}

#[tokio::test]
async fn deleted_backing_image_is_reported_abnormal() {
    if !require_root("deleted_backing_image_is_reported_abnormal") {
        return;
    }
    let d = Driver::start().await;
    let cap = rwo_block();
    let v = create_and_publish(&mut d.controller().await, "gone", 16 * MIB, &cap).await;
    let (staging, target) = (d.path("staging"), d.path("dev"));
    let mut n = d.node().await;
    n.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, &cap, false))
        .await
        .unwrap();
    std::fs::remove_file(&v.publish_context["imagePath"]).unwrap();
    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let condition = stats.volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.contains("deleted"),
        "{}",
        condition.message
    );
    unpublish(&mut n, &v, &target).await;
    unstage(&mut n, &v, &staging).await.unwrap();
}
