//! `handoff-csi demo migration --vm`: a running VM (Debian's kernel and busybox under
//! QEMU) live-migrated between two node plugins in KubeVirt's order, while its guest
//! verifies generation-stamped O_DIRECT rounds on its disk — the published block
//! device of the node it runs on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{
    block_capability, publish_request, release_kernel_resources, spawn, stage_request, BoxError,
    Timeline,
};
use crate::client::{wait_for_socket, CsiClients};
use crate::csi;
use crate::lab::{need, workload_script, Kernel, Vm};

const BLOCKS: u32 = 64;
/// Where the demo keeps Debian's kernel between runs.
const CACHE: &str = "/var/cache/handoff-csi/lab";

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn migration(binary: &Path, hops: u32) -> Result<u64, BoxError> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the demo attaches loop devices and bind-mounts them: run it as root".into());
    }
    need("qemu-system-x86_64", "qemu-system-x86").map_err(|e| {
        format!("{e} (the VM demo also needs busybox-static, cpio and kmod: apt-get install qemu-system-x86 busybox-static cpio kmod)")
    })?;
    println!("preparing the guest: Debian's kernel (fetched once into {CACHE}) and busybox");
    let kernel = Kernel::prepare(Path::new(CACHE))?;
    let dir = tempfile::Builder::new()
        .prefix("handoff-demo-vm-")
        .tempdir()?;
    let root = std::fs::canonicalize(dir.path())?;
    let result = run(binary, &root, &kernel, hops).await;
    release_kernel_resources(&root);
    result
}

struct Attached {
    staging: PathBuf,
    disk: PathBuf,
}

type Controller = csi::controller_client::ControllerClient<tonic::transport::Channel>;
type NodeClient = csi::node_client::NodeClient<tonic::transport::Channel>;

/// ControllerPublish, NodeStage and NodePublish on `node`, as the attacher and kubelet do.
async fn attach(
    ctl: &mut Controller,
    nodes: &mut HashMap<&'static str, NodeClient>,
    root: &Path,
    id: &str,
    node: &'static str,
) -> Result<Attached, BoxError> {
    let cap = block_capability();
    let ctx = ctl
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context;
    let (staging, disk) = (
        root.join(format!("{node}-staging")),
        root.join(format!("{node}-vm-disk")),
    );
    let n = nodes.get_mut(node).ok_or("no such node")?;
    n.node_stage_volume(stage_request(id, &ctx, &staging, &cap))
        .await?;
    n.node_publish_volume(publish_request(id, &ctx, &staging, &disk, &cap))
        .await?;
    Ok(Attached { staging, disk })
}

/// NodeUnpublish, NodeUnstage and ControllerUnpublish on `node`, in that order.
async fn detach(
    ctl: &mut Controller,
    nodes: &mut HashMap<&'static str, NodeClient>,
    id: &str,
    node: &'static str,
    a: &Attached,
) -> Result<(), BoxError> {
    let n = nodes.get_mut(node).ok_or("no such node")?;
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: a.disk.display().to_string(),
    })
    .await?;
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: a.staging.display().to_string(),
    })
    .await?;
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await?;
    Ok(())
}

async fn run(binary: &Path, root: &Path, kernel: &Kernel, hops: u32) -> Result<u64, BoxError> {
    let initrd = kernel.vm_initrd(&root.join("initrd"), &workload_script(BLOCKS))?;
    let controller = spawn(binary, root, "controller", "controller")?;
    let nodes = [
        spawn(binary, root, "node-a", "node")?,
        spawn(binary, root, "node-b", "node")?,
    ];
    for p in std::iter::once(&controller).chain(&nodes) {
        if !wait_for_socket(&p.socket, Duration::from_secs(20)).await {
            return Err(format!("{} did not start", p.name).into());
        }
    }
    let mut ctl = CsiClients::connect(&controller.socket).await?.controller;
    let mut node_clients = HashMap::new();
    for p in &nodes {
        node_clients.insert(p.name, CsiClients::connect(&p.socket).await?.node);
    }
    let t = Timeline {
        start: std::time::Instant::now(),
        state_dir: root.join("controller-state"),
    };
    let cap = block_capability();
    let id = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "vm-disk".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or("CreateVolume returned no volume")?
        .volume_id;
    t.step(
        "provisioner",
        &format!("CreateVolume vm-disk → {id} (RWX block, 16 MiB)"),
    )
    .await;

    let a = attach(&mut ctl, &mut node_clients, root, &id, "node-a").await?;
    t.step(
        "attacher+kubelet",
        "ControllerPublish + NodeStage + NodePublish on node-a",
    )
    .await;
    let mut vm = Vm::start(kernel, &initrd, &a.disk, root, "vm-on-node-a", None)?;
    let mut attached: HashMap<&'static str, Attached> = HashMap::from([("node-a", a)]);
    let mut round = vm.wait_rounds_past(1, Duration::from_secs(180))?;
    t.step(
        "VM on node-a",
        &format!(
            "booted; guest verified round {round} (O_DIRECT, {BLOCKS} blocks, generation-stamped)"
        ),
    )
    .await;
    let mut on: &'static str = "node-a";
    for hop in 0..hops {
        let to: &'static str = if on == "node-a" { "node-b" } else { "node-a" };
        let b = attach(&mut ctl, &mut node_clients, root, &id, to).await?;
        t.step(
            "attacher+kubelet",
            &format!("ControllerPublish + NodeStage + NodePublish on {to}: dual attach"),
        )
        .await;
        let port = free_port()?;
        let target = Vm::start(
            kernel,
            &initrd,
            &b.disk,
            root,
            &format!("vm-hop{hop}-on-{to}"),
            Some(port),
        )?;
        attached.insert(to, b);
        let done = vm.migrate(port, Duration::from_secs(300))?;
        if done["status"] != "completed" {
            return Err(format!("migration to {to} did not complete: {done}").into());
        }
        let _ = vm.qmp("quit", Value::Null);
        let before = vm.last_round();
        vm = target;
        t.step(
            "QEMU",
            &format!(
                "migrated {on} → {to}: {} ms total, {} ms downtime; source QEMU ended",
                done["total-time"], done["downtime"]
            ),
        )
        .await;
        let old = attached.remove(on).expect("attached");
        detach(&mut ctl, &mut node_clients, &id, on, &old).await?;
        t.step(
            "kubelet+attacher",
            &format!("NodeUnpublish + NodeUnstage + ControllerUnpublish on {on}"),
        )
        .await;
        round = vm.wait_rounds_past(before.max(round) + 1, Duration::from_secs(180))?;
        t.step(&format!("VM on {to}"), &format!("guest verified round {round}: every block it wrote before the hop read back, nothing stale"))
            .await;
        on = to;
    }
    drop(vm);
    let last = attached.remove(on).expect("attached");
    detach(&mut ctl, &mut node_clients, &id, on, &last).await?;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await?;
    t.step("cleanup", "VM stopped, volume detached and deleted")
        .await;
    println!("\nguest data check: {round} rounds verified across {hops} live migration(s); no block lost or stale");
    Ok(round)
}
