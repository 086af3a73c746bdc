//! Drives one full CSI lifecycle against a running handoff-csi, the way Kubernetes
//! would: Create → ControllerPublish → NodeStage → NodePublish → write/read →
//! NodeUnpublish → NodeUnstage → ControllerUnpublish → Delete.
//!
//! Usage (as root, with the driver running in --mode all):
//!   cargo run --example lifecycle -- [SOCKET] [block|ext4|xfs] [KUBELET_DIR]
//! Staging and target paths are made inside KUBELET_DIR (the driver's --kubelet-dir,
//! default /var/lib/kubelet), as kubelet would.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use handoff_csi::csi;
use handoff_csi::csi::controller_client::ControllerClient;
use handoff_csi::csi::node_client::NodeClient;
use handoff_csi::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType};
use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};

type BoxError = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(args.next().unwrap_or("/run/handoff-csi/csi.sock".into()));
    let kind = args.next().unwrap_or("ext4".into());
    let kubelet_dir = PathBuf::from(args.next().unwrap_or("/var/lib/kubelet".into()));
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await?;
    let (mut c, mut n) = (
        ControllerClient::new(channel.clone()),
        NodeClient::new(channel),
    );
    let node_id = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner()
        .node_id;

    let access_type = match kind.as_str() {
        "block" => AccessType::Block(Default::default()),
        fs => AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }),
    };
    let cap = csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    std::fs::create_dir_all(&kubelet_dir)?;
    let work = tempfile::Builder::new()
        .prefix("handoff-example-")
        .tempdir_in(&kubelet_dir)?;
    let (staging, target) = (work.path().join("staging"), work.path().join("target"));
    std::fs::create_dir_all(&staging)?;

    let volume = c
        .create_volume(csi::CreateVolumeRequest {
            name: format!("demo-{}", std::process::id()),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 320 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or("no volume in response")?;
    let id = volume.volume_id;
    println!("created   {id} ({} MiB)", volume.capacity_bytes >> 20);
    let ctx = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context;
    println!("attached  to {node_id}: {ctx:?}");
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await?;
    println!("staged    at {}", staging.display());
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await?;
    println!("published at {}", target.display());

    let payload = b"handoff-csi says hello";
    if kind == "block" {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)?;
        dev.write_all_at(payload, 0)?;
        dev.sync_all()?;
        let mut back = vec![0; payload.len()];
        dev.read_exact_at(&mut back, 0)?;
        assert_eq!(back, payload);
    } else {
        std::fs::write(target.join("hello.txt"), payload)?;
        assert_eq!(std::fs::read(target.join("hello.txt"))?, payload);
    }
    println!("wrote and read back {} bytes", payload.len());

    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await?;
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await?;
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id,
        ..Default::default()
    })
    .await?;
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await?;
    println!("unpublished, unstaged, detached and deleted {id}");
    Ok(())
}
