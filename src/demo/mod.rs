//! `handoff-csi demo migration`: a KubeVirt-style live migration on the embedded
//! default, on this machine. A controller and two node plugins run as separate
//! processes on one shared data dir (the stand-in for NFS/CephFS); this code plays the
//! external-attacher, both kubelets and the VM, and checks every block after the hand-off.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::attachment::report::render_table;
use crate::attachment::store::{AttachmentStore, FileStore};
use crate::client::{wait_for_socket, CsiClients};
use crate::csi;
use crate::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
use crate::datacheck;

pub mod vm;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One process of the demo cluster.
struct Process {
    name: &'static str,
    socket: PathBuf,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(binary: &Path, root: &Path, name: &'static str, mode: &str) -> Result<Process, BoxError> {
    let socket = root.join(format!("{name}.sock"));
    let child = Command::new(binary)
        .args(["--mode", mode, "--node-id", name, "--log-level", "warn"])
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--data-dir")
        .arg(root.join("shared-data"))
        .arg("--state-dir")
        .arg(root.join(format!("{name}-state")))
        .arg("--kubelet-dir")
        .arg(root)
        .stdin(Stdio::null())
        .spawn()?;
    Ok(Process {
        name,
        socket,
        child,
    })
}

/// Unmounts everything under `root` and detaches loop devices backed by files under it:
/// the last-resort cleanup of the demo and of the test harness.
pub fn release_kernel_resources(root: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    detach_loops_under(root);
}

/// Detaches the loop devices backed by files under `root` (a busy one goes when it is
/// last closed).
pub fn detach_loops_under(root: &Path) {
    for dev in loops_backed_under(root) {
        if let Ok(f) = std::fs::File::open(&dev) {
            use std::os::fd::AsRawFd;
            // SAFETY: LOOP_CLR_FD takes no argument.
            unsafe { libc::ioctl(f.as_raw_fd(), 0x4C01, 0) };
        }
    }
}

/// Loop devices whose backing file lies under `root`.
pub fn loops_backed_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim_end().trim_end_matches(" (deleted)")).starts_with(root) {
                found.push(PathBuf::from("/dev").join(name));
            }
        }
    }
    found
}

struct Timeline {
    start: Instant,
    state_dir: PathBuf,
}

impl Timeline {
    async fn step(&self, actor: &str, what: &str) {
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        println!("\n[{ms:>8.1} ms] {actor:<14} {what}");
        if let Ok(store) = FileStore::open(&self.state_dir) {
            if let Ok(states) = store.load_all().await {
                for line in render_table(&states, Utc::now()).lines() {
                    println!("               │ {line}");
                }
            }
        }
    }
}

fn block_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

/// Runs the migration scenario; returns the number of blocks verified on the target.
pub async fn migration(binary: &Path, blocks: u64) -> Result<usize, BoxError> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the demo attaches loop devices and bind-mounts them: run it as root".into());
    }
    let dir = tempfile::Builder::new().prefix("handoff-demo-").tempdir()?;
    let root = std::fs::canonicalize(dir.path())?;
    let result = run(binary, &root, blocks).await;
    release_kernel_resources(&root);
    result
}

async fn run(binary: &Path, root: &Path, blocks: u64) -> Result<usize, BoxError> {
    println!("handoff-csi live-migration demo in {}", root.display());
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
    let mut node_a = CsiClients::connect(&nodes[0].socket).await?.node;
    let mut node_b = CsiClients::connect(&nodes[1].socket).await?.node;
    let t = Timeline {
        start: Instant::now(),
        state_dir: root.join("controller-state"),
    };
    let cap = block_capability();
    let size = (blocks * datacheck::BLOCK as u64).next_multiple_of(1 << 20) as i64;

    let volume = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "vm-disk".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    t.step(
        "provisioner",
        &format!(
            "CreateVolume vm-disk → {id} (RWX block, {} MiB)",
            size >> 20
        ),
    )
    .await;

    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let paths = |node: &str| {
        (
            root.join(format!("{node}-staging")),
            root.join(format!("{node}-pod-disk")),
        )
    };
    let ctx_a = ctl
        .controller_publish_volume(publish("node-a"))
        .await?
        .into_inner()
        .publish_context;
    t.step("attacher", "ControllerPublishVolume(node-a)").await;
    let (stage_a, disk_a) = paths("node-a");
    node_a
        .node_stage_volume(stage_request(&id, &ctx_a, &stage_a, &cap))
        .await?;
    node_a
        .node_publish_volume(publish_request(&id, &ctx_a, &stage_a, &disk_a, &cap))
        .await?;
    t.step(
        "kubelet node-a",
        "NodeStageVolume + NodePublishVolume: source virt-launcher has its disk",
    )
    .await;

    let dev_a = datacheck::open_direct(&disk_a, true)?;
    datacheck::write_blocks(&dev_a, 0, blocks, 1)?;
    t.step(
        "VM on node-a",
        &format!("wrote {blocks} checksummed blocks (generation 1, O_DIRECT)"),
    )
    .await;

    let ctx_b = ctl
        .controller_publish_volume(publish("node-b"))
        .await?
        .into_inner()
        .publish_context;
    t.step(
        "attacher",
        "ControllerPublishVolume(node-b): dual attach, migration starts",
    )
    .await;
    let (stage_b, disk_b) = paths("node-b");
    node_b
        .node_stage_volume(stage_request(&id, &ctx_b, &stage_b, &cap))
        .await?;
    node_b
        .node_publish_volume(publish_request(&id, &ctx_b, &stage_b, &disk_b, &cap))
        .await?;
    t.step(
        "kubelet node-b",
        "NodeStageVolume + NodePublishVolume: target virt-launcher ready",
    )
    .await;

    // The VM keeps running on the source while memory is copied.
    let dirty = blocks / 4;
    datacheck::write_blocks(&dev_a, 0, dirty, 2)?;
    drop(dev_a);
    t.step(
        "VM on node-a",
        &format!(
            "still running: rewrote {dirty} blocks (generation 2), then paused for switch-over"
        ),
    )
    .await;

    let mut expected = vec![1u64; blocks as usize];
    expected[..dirty as usize].fill(2);
    let dev_b = datacheck::open_direct(&disk_b, true)?;
    let verified = datacheck::verify_blocks(&dev_b, &expected)
        .map_err(|e| format!("data check FAILED on node-b: {e}"))?;
    t.step("VM on node-b", &format!("resumed: read back all {verified} blocks with O_DIRECT, every checksum and generation correct")).await;
    datacheck::write_blocks(&dev_b, 0, 1, 3)?;
    drop(dev_b);

    node_a
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: disk_a.display().to_string(),
        })
        .await?;
    node_a
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: stage_a.display().to_string(),
        })
        .await?;
    t.step(
        "kubelet node-a",
        "NodeUnpublishVolume + NodeUnstageVolume: source pod gone, loop device detached",
    )
    .await;
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await?;
    t.step(
        "attacher",
        "ControllerUnpublishVolume(node-a): migration completed, node-b is primary",
    )
    .await;

    // Tidy up like Kubernetes would when the VM is deleted.
    node_b
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: disk_b.display().to_string(),
        })
        .await?;
    node_b
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: stage_b.display().to_string(),
        })
        .await?;
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-b".into(),
        ..Default::default()
    })
    .await?;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await?;
    t.step(
        "cleanup",
        "VM deleted: node-b unpublished, detached, volume deleted",
    )
    .await;
    println!("\ndata check: {verified} of {blocks} blocks verified on the migration target; no block lost or stale");
    Ok(verified)
}

fn stage_request(
    id: &str,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    cap: &csi::VolumeCapability,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

fn publish_request(
    id: &str,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    target: &Path,
    cap: &csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}
