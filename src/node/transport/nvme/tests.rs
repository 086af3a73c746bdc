//! The NVMe/TCP transport against fake sysfs trees and a fake fabrics file that plays
//! the kernel: it records the option string and creates the controller and namespace
//! entries a real connect would.

use std::fs;
use std::path::Path;

use parking_lot::Mutex;

use super::*;

const PREFIX: &str = "nqn.2026-11.dev.handoff-csi:";
const ROS_PREFIX: &str = "nqn.2000-02.com.mikrotik:";
const UUID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Plain,
    Multipath,
}

/// Creates, like the kernel, controller `nvme<instance>` of subsystem `nqn` with one
/// namespace of `uuid`.
fn add_controller(root: &Path, instance: u32, nqn: &str, uuid: &str, layout: Layout) {
    let ctrl = root.join(format!("sys/class/nvme/nvme{instance}"));
    fs::create_dir_all(&ctrl).unwrap();
    fs::write(ctrl.join("subsysnqn"), format!("{nqn}\n")).unwrap();
    // In native multipath the head carries the subsystem instance (here 7).
    let (entry, head) = match layout {
        Layout::Plain => (format!("nvme{instance}n1"), format!("nvme{instance}n1")),
        Layout::Multipath => (format!("nvme7c{instance}n1"), "nvme7n1".to_owned()),
    };
    fs::create_dir_all(ctrl.join(&entry)).unwrap();
    let block = root.join("sys/block").join(&head);
    fs::create_dir_all(&block).unwrap();
    fs::write(block.join("uuid"), format!("{uuid}\n")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::write(root.join("dev").join(&head), b"").unwrap();
}

#[derive(Debug)]
struct FakeFabrics {
    root: std::path::PathBuf,
    layout: Layout,
    writes: Mutex<Vec<String>>,
    reply: Mutex<String>,
}

impl Fabrics for FakeFabrics {
    fn connect(&self, options: &str) -> std::io::Result<String> {
        self.writes.lock().push(options.to_owned());
        let nqn = options
            .split(',')
            .find_map(|p| p.strip_prefix("nqn="))
            .unwrap()
            .to_owned();
        add_controller(&self.root, 3, &nqn, UUID, self.layout);
        Ok(self.reply.lock().clone())
    }
}

fn setup(layout: Layout) -> (tempfile::TempDir, Arc<FakeFabrics>, NvmeTransport) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    fs::create_dir_all(root.join("sys/class/nvme")).unwrap();
    fs::create_dir_all(root.join("sys/block")).unwrap();
    let fabrics = Arc::new(FakeFabrics {
        root: root.clone(),
        layout,
        writes: Mutex::new(Vec::new()),
        reply: Mutex::new("instance=3,cntlid=1\n".into()),
    });
    let t = NvmeTransport::new(
        NvmePaths {
            sys_class_nvme: root.join("sys/class/nvme"),
            sys_block: root.join("sys/block"),
            dev: root.join("dev"),
        },
        fabrics.clone(),
        HostIdentity {
            nqn: "nqn.2014-08.org.nvmexpress:uuid:host".into(),
            id: "0000-host".into(),
        },
        &[PREFIX, ROS_PREFIX],
        Duration::from_millis(300),
    );
    (dir, fabrics, t)
}

fn export(volume: &VolumeId) -> ExportInfo {
    ExportInfo::NvmeTcp {
        address: "10.0.0.2".into(),
        port: 4420,
        subsystem_nqn: format!("{PREFIX}{volume}"),
        namespace_uuid: UUID.into(),
        ctrl_loss_tmo: 600,
        host_nqn: None,
    }
}

#[test]
fn the_connect_string_and_the_reply() {
    let v = VolumeId::generate();
    let host = HostIdentity {
        nqn: "nqn.h".into(),
        id: "id-1".into(),
    };
    assert_eq!(
        connect_options(&export(&v), &host, &Timeouts::default()).unwrap(),
        format!("transport=tcp,traddr=10.0.0.2,trsvcid=4420,nqn={PREFIX}{v},hostnqn=nqn.h,hostid=id-1,ctrl_loss_tmo=600,reconnect_delay=10,fast_io_fail_tmo=30,keep_alive_tmo=5")
    );
    assert_eq!(parse_connect_reply("instance=12,cntlid=3\n"), Some((12, 3)));
    for bad in ["", "instance=x,cntlid=1", "cntlid=1", "garbage"] {
        assert_eq!(parse_connect_reply(bad), None, "{bad}");
    }
}

#[test]
fn multipath_paths_map_to_their_heads() {
    assert_eq!(head_of("nvme0c3n1").as_deref(), Some("nvme0n1"));
    assert_eq!(head_of("nvme2n14").as_deref(), Some("nvme2n14"));
    for other in [
        "nvme0",
        "nvme0n1p2",
        "nvme-subsys0",
        "nvmexn1",
        "hwmon1",
        "nvme0c1",
    ] {
        assert_eq!(head_of(other), None, "{other}");
    }
}

#[tokio::test]
async fn connect_finds_the_namespace_by_uuid_in_both_layouts() {
    for (layout, head) in [(Layout::Plain, "nvme3n1"), (Layout::Multipath, "nvme7n1")] {
        let (dir, fabrics, t) = setup(layout);
        let v = VolumeId::generate();
        let d = t.connect(&v, &export(&v), false).await.unwrap();
        assert_eq!(d.path, dir.path().join("dev").join(head), "{layout:?}");
        assert_eq!(fabrics.writes.lock().len(), 1);
        // Connected already: no second connect, same device.
        let again = t.connect(&v, &export(&v), false).await.unwrap();
        assert_eq!(again, d);
        assert_eq!(fabrics.writes.lock().len(), 1, "connect is idempotent");
        assert_eq!(t.find_device(&v).await.unwrap(), Some(d.clone()));
        assert_eq!(t.list().await.unwrap(), vec![d]);
    }
}

#[tokio::test]
async fn a_namespace_with_another_uuid_is_not_taken() {
    let (_dir, _fabrics, t) = setup(Layout::Plain);
    let v = VolumeId::generate();
    let ExportInfo::NvmeTcp {
        address,
        port,
        subsystem_nqn,
        ctrl_loss_tmo,
        ..
    } = export(&v)
    else {
        unreachable!()
    };
    let wrong = ExportInfo::NvmeTcp {
        address,
        port,
        subsystem_nqn,
        namespace_uuid: "00000000-0000-0000-0000-000000000000".into(),
        ctrl_loss_tmo,
        host_nqn: None,
    };
    let err = t.connect(&v, &wrong, false).await.unwrap_err();
    assert!(matches!(err, TransportError::NvmeConnect { .. }), "{err}");
    assert!(err.to_string().contains("did not appear"), "{err}");
}

#[tokio::test]
async fn a_bad_reply_from_the_kernel_is_an_error() {
    let (_dir, fabrics, t) = setup(Layout::Plain);
    *fabrics.reply.lock() = "nonsense".into();
    let v = VolumeId::generate();
    let err = t.connect(&v, &export(&v), false).await.unwrap_err();
    assert!(err.to_string().contains("unexpected answer"), "{err}");
}

#[tokio::test]
async fn subsystems_outside_the_managed_prefix_are_never_touched() {
    let (dir, fabrics, t) = setup(Layout::Plain);
    // The host's root disk: a local NVMe controller of another subsystem.
    add_controller(
        dir.path(),
        0,
        "nqn.2014.08.org.nvmexpress:uuid:rootdisk",
        UUID,
        Layout::Plain,
    );
    let v = VolumeId::generate();
    // A publish_context pointing at it is refused before anything is written.
    let mut foreign = export(&v);
    if let ExportInfo::NvmeTcp { subsystem_nqn, .. } = &mut foreign {
        *subsystem_nqn = "nqn.2014.08.org.nvmexpress:uuid:rootdisk".into();
    }
    assert!(matches!(
        t.connect(&v, &foreign, false).await,
        Err(TransportError::ForeignSubsystem { .. })
    ));
    assert!(fabrics.writes.lock().is_empty());
    // Listing adopts only ours; disconnecting ours never deletes the other controller.
    let d = t.connect(&v, &export(&v), false).await.unwrap();
    assert_eq!(t.list().await.unwrap(), vec![d.clone()]);
    t.disconnect(&d).await.unwrap();
    let ctl = |n: u32| {
        dir.path()
            .join(format!("sys/class/nvme/nvme{n}/delete_controller"))
    };
    assert_eq!(fs::read_to_string(ctl(3)).unwrap(), "1");
    assert!(!ctl(0).exists(), "the root disk's controller was touched");
    // Disconnecting a device whose volume we do not hold touches nothing either.
    let other = Device {
        volume_id: VolumeId::generate(),
        path: dir.path().join("dev/nvme0n1"),
        backing_deleted: false,
    };
    t.disconnect(&other).await.unwrap();
    assert!(!ctl(0).exists());
}

#[tokio::test]
async fn growth_asks_the_controller_to_rescan() {
    let (dir, _fabrics, t) = setup(Layout::Plain);
    let v = VolumeId::generate();
    let d = t.connect(&v, &export(&v), false).await.unwrap();
    t.refresh_capacity(&d).await.unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("sys/class/nvme/nvme3/rescan_controller")).unwrap(),
        "1"
    );
}

#[test]
fn host_identity_prefers_etc_nvme_and_is_stable_otherwise() {
    let etc = tempfile::tempdir().unwrap();
    let own = tempfile::tempdir().unwrap();
    let first = HostIdentity::load_or_create(etc.path(), own.path()).unwrap();
    assert!(first.nqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
    assert!(first.nqn.ends_with(&first.id));
    let second = HostIdentity::load_or_create(etc.path(), own.path()).unwrap();
    assert_eq!(first, second, "the same identity on every start");
    fs::write(
        etc.path().join("hostnqn"),
        "nqn.2014-08.org.nvmexpress:uuid:from-etc\n",
    )
    .unwrap();
    fs::write(etc.path().join("hostid"), "from-etc\n").unwrap();
    let etc_id = HostIdentity::load_or_create(etc.path(), own.path()).unwrap();
    assert_eq!(etc_id.nqn, "nqn.2014-08.org.nvmexpress:uuid:from-etc");
    assert_eq!(etc_id.id, "from-etc");
}

#[tokio::test]
async fn routeros_subsystems_connect_without_a_namespace_uuid() {
    let (dir, fabrics, t) = setup(Layout::Plain);
    // A volume the Go driver made: pvc-<uuid>, RouterOS's NQN prefix, no namespace UUID.
    let v = VolumeId::parse("pvc-3c6f1a2b-1111-4222-8333-944455556666").unwrap();
    let e = ExportInfo::NvmeTcp {
        address: "10.0.0.9".into(),
        port: 4420,
        subsystem_nqn: format!("{ROS_PREFIX}{v}"),
        namespace_uuid: String::new(),
        ctrl_loss_tmo: 60,
        host_nqn: None,
    };
    let d = t.connect(&v, &e, false).await.unwrap();
    assert_eq!(d.path, dir.path().join("dev/nvme3n1"));
    let written = fabrics.writes.lock()[0].clone();
    assert!(
        written.contains(&format!(",nqn={ROS_PREFIX}{v},")),
        "{written}"
    );
    assert!(
        written.contains(",hostnqn=nqn.2014-08.org.nvmexpress:uuid:host,"),
        "{written}"
    );
    assert_eq!(t.list().await.unwrap(), vec![d]);
}

#[tokio::test]
async fn the_host_named_by_the_target_is_used_with_its_own_id() {
    let (_dir, fabrics, t) = setup(Layout::Plain);
    let v = VolumeId::generate();
    let node = crate::ids::NodeId::parse("node-a").unwrap();
    let nqn = crate::export::node_host_nqn(&node);
    let mut e = export(&v);
    if let ExportInfo::NvmeTcp { host_nqn, .. } = &mut e {
        *host_nqn = Some(nqn.clone());
    }
    t.connect(&v, &e, false).await.unwrap();
    let written = fabrics.writes.lock()[0].clone();
    let id = crate::export::host_id_of(&nqn);
    assert!(
        written.contains(&format!(",hostnqn={nqn},hostid={id},")),
        "{written}"
    );
    // Stable: the same node always gets the same pair.
    assert_eq!(crate::export::node_host_nqn(&node), nqn);
    assert_ne!(id, "0000-host");
}

#[tokio::test]
async fn nothing_from_publish_context_adds_fabrics_options() {
    let (_dir, fabrics, t) = setup(Layout::Plain);
    let v = VolumeId::generate();
    for (address, host) in [
        ("10.0.0.2,hostnqn=evil", None),
        ("", None),
        ("10.0.0.2", Some("nqn.x,ctrl_loss_tmo=-1")),
        ("10.0.0.2", Some("nqn x")),
    ] {
        let mut e = export(&v);
        if let ExportInfo::NvmeTcp {
            address: a,
            host_nqn,
            ..
        } = &mut e
        {
            *a = address.into();
            *host_nqn = host.map(Into::into);
        }
        let err = t.connect(&v, &e, false).await.unwrap_err();
        assert!(matches!(err, TransportError::NvmeConnect { .. }), "{err}");
    }
    assert!(fabrics.writes.lock().is_empty());
}

/// The namespace wait wakes on a kernel uevent instead of sleeping out its interval.
/// Needs root: it asks the kernel for a synthetic "change" event of /dev/null.
#[test]
fn a_uevent_wakes_the_wait() {
    if !nix::unistd::geteuid().is_root() {
        let msg = "a_uevent_wakes_the_wait: needs root to trigger a kernel uevent";
        if std::env::var("HANDOFF_ALLOW_UNPRIVILEGED_SKIP").as_deref() == Ok("1") {
            eprintln!("SKIPPED {msg}");
            return;
        }
        panic!("{msg}; run as root as CI does, or set HANDOFF_ALLOW_UNPRIVILEGED_SKIP=1");
    }
    let u = Uevents::open().expect("uevent socket");
    let trigger = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(50));
        fs::write("/sys/devices/virtual/mem/null/uevent", "change").unwrap();
    });
    let t = Instant::now();
    u.wait(Duration::from_secs(10));
    trigger.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// Issue 17: another initiator's controller of the same subsystem in this kernel (or
/// one left under a stale identity) is never this node's: not reused at connect, not
/// found, not disconnected. The kernel lab's fence runs two such nodes in one guest.
#[tokio::test]
async fn another_hosts_controller_of_the_subsystem_is_not_ours() {
    let (dir, fabrics, t) = setup(Layout::Plain);
    let v = VolumeId::generate();
    let nqn = format!("{PREFIX}{v}");
    add_controller(dir.path(), 0, &nqn, UUID, Layout::Plain);
    fs::write(
        dir.path().join("sys/class/nvme/nvme0/hostnqn"),
        "nqn.2014-08.org.nvmexpress:uuid:someone-else\n",
    )
    .unwrap();
    assert!(t.find_device(&v).await.unwrap().is_none(), "not ours");
    let dev = t.connect(&v, &export(&v), false).await.unwrap();
    assert_eq!(
        fabrics.writes.lock().len(),
        1,
        "connected as itself, not reused"
    );
    assert_eq!(dev.path, dir.path().join("dev/nvme3n1"));
    t.disconnect(&dev).await.unwrap();
    assert!(
        !dir.path()
            .join("sys/class/nvme/nvme0/delete_controller")
            .exists(),
        "the other host's controller is left alone"
    );
    assert!(dir
        .path()
        .join("sys/class/nvme/nvme3/delete_controller")
        .exists());
}
