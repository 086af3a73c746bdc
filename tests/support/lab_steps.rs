//! The CSI calls and data checks the kernel lab's guest halves share.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use handoff_csi::csi;

use super::{block_cap, publish_request, Driver};

/// Guest test runs that passed (each runs one test; kernel messages may interleave).
pub fn passed(log: &str) -> usize {
    log.matches("test result: ok. 1 passed; 0 failed").count()
}

pub fn rwx() -> csi::VolumeCapability {
    block_cap(csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter)
}

pub fn stage(
    id: &str,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    }
}

pub fn publish_node(
    id: &str,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    target: &Path,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    }
}

/// O_DIRECT: what reaches the device, not the page cache.
pub fn open_direct(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
}

/// A 4 KiB-aligned buffer for O_DIRECT.
pub fn aligned(fill: u8) -> Vec<u8> {
    let mut v = vec![0u8; 8192];
    let off = v.as_ptr().align_offset(4096);
    v.drain(..off);
    v.truncate(4096);
    v.iter_mut().for_each(|b| *b = fill);
    v
}

pub fn write_read(path: &Path, offset: u64, fill: u8) -> std::io::Result<()> {
    let f = open_direct(path)?;
    let block = aligned(fill);
    f.write_all_at(&block, offset)?;
    let mut back = aligned(0);
    f.read_exact_at(&mut back, offset)?;
    if back != block {
        return Err(std::io::Error::other("read back other data"));
    }
    Ok(())
}

/// NodeUnpublish, then NodeUnstage, as kubelet tears a volume down.
pub async fn node_teardown(
    n: &mut handoff_csi::csi::node_client::NodeClient<tonic::transport::Channel>,
    id: &str,
    staging: &Path,
    target: &Path,
) -> Result<(), tonic::Status> {
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await?;
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await?;
    Ok(())
}

/// ControllerPublish (through `ctl`), NodeStage and NodePublish on `d`.
pub async fn attach_to(
    ctl: &Driver,
    d: &Driver,
    node: &str,
    id: &str,
    cap: &csi::VolumeCapability,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let ctx = ctl
        .controller()
        .await
        .controller_publish_volume(publish_request(id, node, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let (staging, target) = (
        d.path(&format!("{name}-staging")),
        d.path(&format!("{name}-disk")),
    );
    std::fs::create_dir_all(&staging).unwrap();
    let mut n = d.node().await;
    let mut st = stage(id, &ctx, &staging);
    st.volume_capability = Some(cap.clone());
    n.node_stage_volume(st).await.unwrap();
    let mut p = publish_node(id, &ctx, &staging, &target);
    p.volume_capability = Some(cap.clone());
    n.node_publish_volume(p).await.unwrap();
    (staging, target)
}

pub async fn detach_from(
    ctl: &Driver,
    d: &Driver,
    node: &str,
    id: &str,
    (staging, target): (std::path::PathBuf, std::path::PathBuf),
) {
    let mut n = d.node().await;
    node_teardown(&mut n, id, &staging, &target).await.unwrap();
    ctl.controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

pub fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
