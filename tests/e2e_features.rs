//! Privileged: snapshots, restores and online expansion through real loop devices and
//! filesystems, and crash-consistent snapshots of an attached volume on an xfs data dir
//! with reflink.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_csi::csi;
use handoff_csi::datacheck;
use support::*;

/// Stage + publish `volume` on the all-in-one driver; returns (staging, target).
async fn attach(
    d: &Driver,
    id: &str,
    cap: &csi::VolumeCapability,
    tag: &str,
) -> (PathBuf, PathBuf) {
    let ctx = d
        .controller()
        .await
        .controller_publish_volume(publish_request(id, "node-a", cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let (staging, target) = (
        d.path(&format!("staging-{tag}")),
        d.path(&format!("target-{tag}")),
    );
    let mut n = d.node().await;
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    (staging, target)
}

async fn detach(d: &Driver, id: &str, staging: &Path, target: &Path) {
    let mut n = d.node().await;
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
    d.controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn create(d: &Driver, name: &str, bytes: i64, cap: &csi::VolumeCapability) -> String {
    d.controller()
        .await
        .create_volume(create_request(name, bytes, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn total_bytes(d: &Driver, id: &str, path: &Path) -> i64 {
    d.node()
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .usage[0]
        .total
}

async fn grow(d: &Driver, id: &str, bytes: i64, path: &Path) -> i64 {
    let r = d
        .controller()
        .await
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    d.node()
        .await
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .capacity_bytes
}

#[tokio::test]
async fn online_expansion_of_mounted_filesystems_and_block_devices() {
    if !require_root("online_expansion_of_mounted_filesystems_and_block_devices") {
        return;
    }
    let d = Driver::start().await;
    let ext4_online =
        handoff_csi::node::mount::has_capability(handoff_csi::node::mount::CAP_SYS_RESOURCE);
    for (fs, from, to) in [("ext4", 64, 192), ("xfs", 320, 512)] {
        let cap = rwo_mount(fs);
        let id = create(&d, &format!("grow-{fs}"), from * MIB, &cap).await;
        let (staging, target) = attach(&d, &id, &cap, fs).await;
        std::fs::write(target.join("keep"), b"still here").unwrap();
        let before = total_bytes(&d, &id, &target).await;
        assert!(before <= from * MIB);
        if fs == "ext4" && !ext4_online {
            // This sandbox withholds CAP_SYS_RESOURCE, which the kernel requires for ext4
            // online resize; the driver must say so instead of failing obscurely.
            eprintln!("NOTE: no CAP_SYS_RESOURCE here: checking the ext4 refusal, not the growth");
            let status = d
                .node()
                .await
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            assert!(
                status.message().contains("CAP_SYS_RESOURCE"),
                "{}",
                status.message()
            );
            assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"still here");
            detach(&d, &id, &staging, &target).await;
            continue;
        }
        assert_eq!(grow(&d, &id, to * MIB, &target).await, to * MIB);
        let after = total_bytes(&d, &id, &target).await;
        assert!(
            after > (to - from / 2) * MIB && after <= to * MIB,
            "{fs}: {before} → {after}"
        );
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"still here");
        detach(&d, &id, &staging, &target).await;
    }
    let cap = rwo_block();
    let id = create(&d, "grow-block", 16 * MIB, &cap).await;
    let (staging, target) = attach(&d, &id, &cap, "block").await;
    assert_eq!(total_bytes(&d, &id, &target).await, 16 * MIB);
    assert_eq!(grow(&d, &id, 48 * MIB, &target).await, 48 * MIB);
    assert_eq!(
        total_bytes(&d, &id, &target).await,
        48 * MIB,
        "the loop device sees the new size"
    );
    detach(&d, &id, &staging, &target).await;
}

#[tokio::test]
async fn restored_filesystem_has_the_snapshot_data() {
    if !require_root("restored_filesystem_has_the_snapshot_data") {
        return;
    }
    let d = Driver::start().await;
    let cap = rwo_mount("ext4");
    let id = create(&d, "fs-src", 64 * MIB, &cap).await;
    let (staging, target) = attach(&d, &id, &cap, "src").await;
    std::fs::write(target.join("report.txt"), b"quarterly numbers").unwrap();
    detach(&d, &id, &staging, &target).await;
    let snap = d
        .controller()
        .await
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "fs-snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let mut req = create_request("fs-restored", 128 * MIB, cap.clone());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id,
            },
        )),
    });
    let restored = d
        .controller()
        .await
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = attach(&d, &restored, &cap, "restored").await;
    assert_eq!(
        std::fs::read(target.join("report.txt")).unwrap(),
        b"quarterly numbers"
    );
    let volume = d
        .controller()
        .await
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: restored.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        volume.capacity_bytes,
        128 * MIB,
        "the restore is as large as requested"
    );
    if handoff_csi::node::mount::has_capability(handoff_csi::node::mount::CAP_SYS_RESOURCE) {
        assert!(
            total_bytes(&d, &restored, &target).await > 100 * MIB,
            "grown to its device at stage"
        );
    }
    detach(&d, &restored, &staging, &target).await;
}

/// An xfs filesystem with reflink on a loop device of its own, used as the data dir.
struct XfsDataDir {
    dir: tempfile::TempDir,
    device: String,
}

impl XfsDataDir {
    fn new() -> XfsDataDir {
        let dir = tempfile::Builder::new()
            .prefix("handoff-test-xfs-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img));
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .unwrap();
        let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        ok(Command::new("mount").arg(&device).arg(&mnt));
        XfsDataDir { dir, device }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for XfsDataDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[tokio::test]
async fn snapshots_of_attached_volumes_are_crash_consistent_with_reflink() {
    if !require_root("snapshots_of_attached_volumes_are_crash_consistent_with_reflink") {
        return;
    }
    let xfs = XfsDataDir::new();
    let d = Driver::start_with(DriverOptions {
        data_dir: Some(xfs.path().join("data")),
        ..Default::default()
    })
    .await;
    let cap = rwo_block();
    let id = create(&d, "busy", 16 * MIB, &cap).await;
    let (staging, target) = attach(&d, &id, &cap, "busy").await;
    let dev = datacheck::open_direct(&target, true).unwrap();
    datacheck::write_blocks(&dev, 0, 1024, 1).unwrap();
    // Snapshot while attached: allowed because the copy is a reflink (point in time).
    let snap = d
        .controller()
        .await
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "busy-snap".into(),
            ..Default::default()
        })
        .await
        .expect("reflink snapshot of an attached volume")
        .into_inner()
        .snapshot
        .unwrap();
    datacheck::write_blocks(&dev, 0, 1024, 2).unwrap();
    drop(dev);
    let snap_image = xfs
        .path()
        .join("data/snapshots")
        .join(format!("{}.img", snap.snapshot_id));
    let snap_file = datacheck::open_direct(&snap_image, false).unwrap();
    assert_eq!(
        datacheck::verify_blocks(&snap_file, &[1; 1024]),
        Ok(1024),
        "snapshot holds generation 1"
    );
    detach(&d, &id, &staging, &target).await;
    drop(d);
}

#[tokio::test]
async fn a_filesystem_that_went_read_only_after_an_error_is_reported_abnormal() {
    if !require_root("a_filesystem_that_went_read_only_after_an_error_is_reported_abnormal") {
        return;
    }
    let d = Driver::start().await;
    let mut cap = rwo_mount("ext4");
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = vec!["errors=remount-ro".into()];
    }
    let id = create(&d, "fs-error", 64 * MIB, &cap).await;
    let (staging, target) = attach(&d, &id, &cap, "err").await;
    let mut node = d.node().await;
    let req = csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        ..Default::default()
    };
    let condition = node
        .node_get_volume_stats(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume_condition
        .unwrap();
    assert!(!condition.abnormal, "{condition:?}");
    // Make ext4 hit an error, as a failing disk would.
    let device = loops_under(&std::fs::canonicalize(d.data_dir()).unwrap())
        .pop()
        .unwrap();
    let name = device.file_name().unwrap().to_str().unwrap().to_owned();
    std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1").unwrap();
    let condition = node
        .node_get_volume_stats(req)
        .await
        .unwrap()
        .into_inner()
        .volume_condition
        .unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.contains("read-only after an error"),
        "{}",
        condition.message
    );
    detach(&d, &id, &staging, &target).await;
}
