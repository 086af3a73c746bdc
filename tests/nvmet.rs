//! The `nvmet` backend through the real binary. Here configfs is a plain directory
//! (this kernel has no nvmet): the driver's mkdir/write/symlink sequence lands there
//! and is checked. `real_kernel_*` tests run against the kernel's nvmet and nvme-tcp
//! where they exist, when HANDOFF_NVME_KERNEL_TESTS=1; otherwise they say why not.

mod support;

use std::path::{Path, PathBuf};

use handoff_csi::csi;
use handoff_csi::export::node_host_nqn;
use handoff_csi::ids::NodeId;
use support::{block_cap, create_request, publish_request, Driver, DriverOptions};

const PREFIX: &str = "nqn.2026-11.dev.handoff-csi:";

fn rwx() -> csi::VolumeCapability {
    block_cap(csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter)
}

fn host(node: &str) -> String {
    node_host_nqn(&NodeId::parse(node).unwrap())
}

fn unpublish(volume: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

async fn controller(configfs: &Path) -> Driver {
    Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--backend".into(),
            "nvmet".into(),
            "--nvmet-configfs".into(),
            configfs.display().to_string(),
            "--nvmet-address".into(),
            "10.0.0.2".into(),
        ],
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn publish_admits_only_published_nodes_and_unpublish_fences() {
    let cfg = tempfile::tempdir().unwrap();
    let nvmet: PathBuf = cfg.path().join("nvmet");
    for d in ["subsystems", "ports", "hosts"] {
        std::fs::create_dir_all(nvmet.join(d)).unwrap();
    }
    let d = controller(&nvmet).await;
    let mut c = d.controller().await;
    let id = c
        .create_volume(create_request("vm-disk", 64 << 20, rwx()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let sub = nvmet.join("subsystems").join(format!("{PREFIX}{id}"));

    let ctx = c
        .controller_publish_volume(publish_request(&id, "node-a", rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["transport"], "nvme-tcp");
    assert_eq!(ctx["nvmeAddress"], "10.0.0.2");
    assert_eq!(ctx["nvmeSubsystemNqn"], format!("{PREFIX}{id}"));
    assert_eq!(ctx["nvmeHostNqn"], host("node-a"));
    assert_eq!(ctx["nvmeCtrlLossTmo"], "600");
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(sub.join("attr_allow_any_host")), "0");
    assert_eq!(read(sub.join("namespaces/1/enable")), "1");
    let image = read(sub.join("namespaces/1/device_path"));
    assert!(
        image.starts_with(&d.data_dir().display().to_string()),
        "{image}"
    );
    let uuid = read(sub.join("namespaces/1/device_uuid"));
    assert_eq!(uuid.replace('-', ""), id.trim_start_matches("vol-"));
    assert_eq!(read(nvmet.join("ports/1/addr_traddr")), "10.0.0.2");
    assert!(nvmet
        .join("ports/1/subsystems")
        .join(format!("{PREFIX}{id}"))
        .is_symlink());
    let allowed = |node: &str| sub.join("allowed_hosts").join(host(node)).is_symlink();
    assert!(allowed("node-a"));
    assert!(!allowed("node-b"), "only published nodes are admitted");

    // Live migration: the target is admitted, then the source detached and fenced.
    c.controller_publish_volume(publish_request(&id, "node-b", rwx()))
        .await
        .unwrap();
    assert!(allowed("node-a") && allowed("node-b"));
    c.controller_unpublish_volume(unpublish(&id, "node-a"))
        .await
        .unwrap();
    assert!(!allowed("node-a"), "the source lost access at the target");
    assert!(allowed("node-b"), "the target kept it");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["attachments", "--state-dir"])
        .arg(d.state_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("node-b [fenced: node-a]"), "{table}");

    // Growth reaches connected hosts through revalidate_size.
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 128 << 20,
            limit_bytes: 0,
        }),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(read(sub.join("namespaces/1/revalidate_size")), "1");

    c.controller_unpublish_volume(unpublish(&id, "node-b"))
        .await
        .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!nvmet
        .join("ports/1/subsystems")
        .join(format!("{PREFIX}{id}"))
        .exists());
    assert!(!sub.exists(), "the subsystem is gone");
    assert!(!Path::new(&image).exists(), "the image is gone");
}

#[tokio::test]
async fn probe_fails_without_nvmet_in_configfs() {
    let cfg = tempfile::tempdir().unwrap();
    let d = controller(&cfg.path().join("nvmet")).await;
    let probe = d.identity().await.probe(csi::ProbeRequest {}).await;
    let msg = match probe {
        Err(s) => s.message().to_owned(),
        Ok(r) => format!("{:?}", r.into_inner()),
    };
    assert!(msg.contains("nvmet"), "{msg}");
}

/// Why the real-kernel tests cannot run here, or None when they can.
fn kernel_skip_reason() -> Option<String> {
    if std::env::var("HANDOFF_NVME_KERNEL_TESTS").as_deref() != Ok("1") {
        return Some("HANDOFF_NVME_KERNEL_TESTS=1 is not set (these tests load nvmet and connect over loopback)".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    for (path, module) in [
        ("/sys/kernel/config/nvmet", "nvmet and nvmet-tcp"),
        ("/dev/nvme-fabrics", "nvme-tcp"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!(
                "{path} is missing: this kernel has no {module} (modprobe {module})"
            ));
        }
    }
    None
}

/// A volume exported by nvmet on 127.0.0.1, connected by the node transport, written
/// and read through /dev/nvmeXnY; after the node is denied, its I/O fails.
#[tokio::test]
async fn real_kernel_export_connect_io_and_fence() {
    if let Some(why) = kernel_skip_reason() {
        eprintln!("SKIPPED real_kernel_export_connect_io_and_fence: {why}");
        return;
    }
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::time::Duration;

    use handoff_csi::backend::file::FileBackend;
    use handoff_csi::backend::nvmet::{KernelConfigFs, Nvmet, PortConfig};
    use handoff_csi::backend::nvmet_file::NvmetBackend;
    use handoff_csi::backend::{Backend, CapacityRange, CreateVolume, StoredCapability};
    use handoff_csi::capability::AccessMode;
    use handoff_csi::ids::VolumeName;
    use handoff_csi::node::transport::nvme::{DevFabrics, HostIdentity, NvmePaths, NvmeTransport};
    use handoff_csi::node::transport::Transport;

    let data = tempfile::tempdir().unwrap();
    let files: Arc<dyn Backend> = Arc::new(FileBackend::open(data.path()).unwrap());
    let port_id = 4242;
    let target = Nvmet::new(
        KernelConfigFs,
        "/sys/kernel/config/nvmet".into(),
        PortConfig {
            id: port_id,
            address: "127.0.0.1".into(),
            port: 14420,
            family: "ipv4",
        },
        PREFIX,
    );
    let b = NvmetBackend::new(files, target);
    let v = b
        .create_volume(&CreateVolume {
            name: VolumeName::parse("kernel-test").unwrap(),
            capacity: CapacityRange {
                required: 64 << 20,
                limit: 0,
            },
            capabilities: vec![StoredCapability {
                mode: AccessMode::MultiNodeMultiWriter,
                block: true,
            }],
            parameters: handoff_csi::params::VolumeParams::try_from(
                &std::collections::HashMap::from([("nvmeCtrlLossTmo".to_owned(), "10".to_owned())]),
            )
            .unwrap(),
            source: None,
            source_in_use: false,
        })
        .await
        .unwrap();
    let node = NodeId::parse("kernel-test-node").unwrap();
    let export = b.export(&v, &node).await.unwrap();
    b.allow_node(&v, &node).await.unwrap();
    let own = tempfile::tempdir().unwrap();
    let t = NvmeTransport::new(
        NvmePaths::default(),
        Arc::new(DevFabrics("/dev/nvme-fabrics".into())),
        HostIdentity::load_or_create(Path::new("/etc/nvme"), own.path()).unwrap(),
        &[PREFIX],
        Duration::from_secs(20),
    );
    let dev = t.connect(&v.id, &export, false).await.unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev.path)
        .unwrap();
    let block = vec![0xa5u8; 4096];
    f.write_all_at(&block, 8192).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, 8192).unwrap();
    assert_eq!(back, block);
    drop(f);
    // Fenced: the connection is cut and the host may not come back.
    b.deny_node(&v.id, &node).await.unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let f = std::fs::OpenOptions::new().read(true).open(&dev.path);
    let failed = match f {
        Err(_) => true,
        Ok(f) => f.read_exact_at(&mut back, 0).is_err(),
    };
    assert!(failed, "I/O still works after the node was fenced");
    t.disconnect(&dev).await.unwrap();
    b.delete_volume(&v.id).await.unwrap();
    let _ = std::fs::remove_dir(format!("/sys/kernel/config/nvmet/ports/{port_id}"));
}

/// nvmet's configfs on another host, through the shell commands the SSH variant sends;
/// here the "remote" shell is a local `sh -c`, so quoting meets a real shell.
#[tokio::test(flavor = "multi_thread")]
async fn remote_configfs_commands_work_in_a_real_shell_and_quote_safely() {
    use std::sync::Arc;

    use handoff_csi::backend::nvmet::{ConfigFs, Nvmet, PortConfig, RemoteConfigFs};
    use handoff_csi::backend::ssh::{CommandShell, ShellError};
    use handoff_csi::ids::VolumeId;

    struct LocalShell;
    #[async_trait::async_trait]
    impl CommandShell for LocalShell {
        async fn run(&self, command: &str) -> Result<String, ShellError> {
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .output()
                .await
                .map_err(|e| ShellError::Session(e.to_string()))?;
            Ok(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nvmet");
    let v = VolumeId::generate();
    let nqn = format!("{PREFIX}{v}");
    let sub = root.join("subsystems").join(&nqn);
    // What configfs makes by itself when a subsystem or port is created (the port here
    // stands for one set up before).
    for d in [
        sub.join("namespaces"),
        sub.join("allowed_hosts"),
        root.join("hosts"),
        root.join("ports/1/subsystems"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let exported = tokio::task::spawn_blocking({
        let (root, v) = (root.clone(), v.clone());
        let fs = RemoteConfigFs::new(Arc::new(LocalShell));
        move || {
            let t = Nvmet::new(
                fs,
                root,
                PortConfig {
                    id: 1,
                    address: "10.0.0.2".into(),
                    port: 4420,
                    family: "ipv4",
                },
                PREFIX,
            );
            t.export(&v, &v.uuid(), Path::new("/data/volumes/x.img"), 600)
                .unwrap();
            t.allow_host(&v, &host("node-a")).unwrap();
            t.allow_host(&v, &host("node-b")).unwrap();
            t.deny_host(&v, &host("node-a"), true).unwrap();
            // Exporting again does not rewrite the enabled namespace.
            t.export(&v, &v.uuid(), Path::new("/elsewhere.img"), 600)
                .unwrap();
            t.is_exported(&v).unwrap()
        }
    })
    .await
    .unwrap();
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(sub.join("attr_allow_any_host")), "0");
    assert_eq!(
        read(sub.join("namespaces/1/device_path")),
        "/data/volumes/x.img"
    );
    assert_eq!(read(sub.join("namespaces/1/enable")), "1");
    assert!(sub.join("allowed_hosts").join(host("node-b")).is_symlink());
    assert!(!sub.join("allowed_hosts").join(host("node-a")).exists());
    assert!(root.join("ports/1/subsystems").join(&nqn).is_symlink());
    assert!(exported);

    // Quoting: a hostile value is written verbatim and runs nothing.
    let evil = "x'; touch pwned; echo '$(id) `id`";
    let target = dir.path().join("value");
    let canary = std::env::current_dir().unwrap().join("pwned");
    tokio::task::spawn_blocking({
        let target = target.clone();
        let fs = RemoteConfigFs::new(Arc::new(LocalShell));
        move || fs.write(&target, evil).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(read(target), evil);
    assert!(!canary.exists(), "the value ran as a command");
    // A failing command is an error with what it printed, not a silent success.
    let err = tokio::task::spawn_blocking({
        let missing = dir.path().join("no/such/dir");
        let fs = RemoteConfigFs::new(Arc::new(LocalShell));
        move || fs.mkdir(&missing).unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

/// Issue 15 case 10: nvmet on a storage host that becomes unreachable. The fence through
/// the AttachmentManager fails closed (the node keeps its slot, another node is refused)
/// and a delete fails instead of removing the image of a still-exported volume.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_storage_host_never_reads_as_fenced_or_unexported() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use handoff_csi::attachment::cluster::Standalone;
    use handoff_csi::attachment::events::RecordingSink;
    use handoff_csi::attachment::fence::BackendFence;
    use handoff_csi::attachment::state::PublishRequest;
    use handoff_csi::attachment::store::MemoryStore;
    use handoff_csi::attachment::{AttachError, AttachmentManager, Policy};
    use handoff_csi::backend::file::FileBackend;
    use handoff_csi::backend::nvmet::{Nvmet, PortConfig, RemoteConfigFs};
    use handoff_csi::backend::nvmet_file::NvmetBackend;
    use handoff_csi::backend::ssh::{CommandShell, ShellError};
    use handoff_csi::backend::{Backend, CapacityRange, CreateVolume, StoredCapability};
    use handoff_csi::capability::AccessMode;
    use handoff_csi::ids::VolumeName;

    /// A local `sh`, until the "network" drops.
    struct FlakyShell(Arc<AtomicBool>);
    #[async_trait::async_trait]
    impl CommandShell for FlakyShell {
        async fn run(&self, command: &str) -> Result<String, ShellError> {
            if self.0.load(Ordering::SeqCst) {
                return Err(ShellError::Connect {
                    address: "storage-host:22".into(),
                    reason: "no route to host".into(),
                });
            }
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .output()
                .await
                .map_err(|e| ShellError::Session(e.to_string()))?;
            Ok(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nvmet");
    for d in ["subsystems", "hosts", "ports"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let down = Arc::new(AtomicBool::new(false));
    let fs = RemoteConfigFs::new(Arc::new(FlakyShell(down.clone())));
    let target = Nvmet::new(
        fs,
        root.clone(),
        PortConfig {
            id: 1,
            address: "10.0.0.2".into(),
            port: 4420,
            family: "ipv4",
        },
        PREFIX,
    );
    let files: Arc<dyn Backend> = Arc::new(FileBackend::open(&dir.path().join("data")).unwrap());
    let backend: Arc<dyn Backend> = Arc::new(NvmetBackend::new(files, target));
    let cap = StoredCapability {
        mode: AccessMode::SingleNodeWriter,
        block: true,
    };
    let volume = backend
        .create_volume(&CreateVolume {
            name: VolumeName::parse("nvmet-down").unwrap(),
            capacity: CapacityRange {
                required: 1 << 20,
                limit: 0,
            },
            capabilities: vec![cap],
            parameters: Default::default(),
            source: None,
            source_in_use: false,
        })
        .await
        .unwrap();
    let m = AttachmentManager::load(
        Arc::new(MemoryStore::default()),
        Arc::new(Standalone),
        Arc::new(RecordingSink::default()),
        Policy::default(),
    )
    .await
    .unwrap()
    .with_fence(Arc::new(BackendFence::new(backend.clone())));
    let (a, b) = (
        NodeId::parse("node-a").unwrap(),
        NodeId::parse("node-b").unwrap(),
    );
    let req = |n: &NodeId| PublishRequest {
        node_id: n.clone(),
        readonly: false,
        access: cap,
    };
    // What configfs makes by itself under a new subsystem (a plain dir stands in here).
    let sub = root
        .join("subsystems")
        .join(format!("{PREFIX}{}", volume.id));
    for d in [
        sub.join("namespaces"),
        sub.join("allowed_hosts"),
        root.join("ports/1/subsystems"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    m.publish(&volume.id, Duration::from_secs(300), req(&a))
        .await
        .unwrap();
    backend.export(&volume, &a).await.unwrap();
    backend.allow_node(&volume, &a).await.unwrap();
    let permission = sub.join("allowed_hosts").join(host("node-a"));
    assert!(permission.is_symlink());

    down.store(true, Ordering::SeqCst);
    let err = m.unpublish(&volume.id, &a).await.unwrap_err();
    assert!(matches!(err, AttachError::Fence(_)), "{err}");
    assert!(permission.is_symlink(), "nothing was changed at the target");
    let state = m.state(&volume.id).await.unwrap().unwrap();
    assert!(
        state.nodes[0].fencing,
        "the node keeps its slot, marked as leaving"
    );
    let refused = m
        .publish(&volume.id, Duration::from_secs(300), req(&b))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("node-a"), "{refused}");
    assert!(
        backend.delete_volume(&volume.id).await.is_err(),
        "a delete that could not unexport"
    );
    assert!(
        backend.get_volume(&volume.id).await.unwrap().is_some(),
        "the image is kept"
    );

    // The host is back: the reconciler completes the fence, and B may attach.
    down.store(false, Ordering::SeqCst);
    let r = m.reconcile(Duration::ZERO).await.unwrap();
    assert_eq!(r.cleared.len(), 1, "{r:?}");
    assert!(!permission.exists(), "node-a's permission is gone");
    m.publish(&volume.id, Duration::from_secs(300), req(&b))
        .await
        .unwrap();
}
