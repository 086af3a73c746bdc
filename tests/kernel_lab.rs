//! The NVMe/TCP data plane on a real kernel (Debian's 6.1 under QEMU, see
//! support/kernel_lab.rs): nvmet's configfs, the kernel's nvme-tcp host, a node's
//! connect, namespace discovery in the real sysfs, O_DIRECT data, and the fence. Each
//! `guest_*` test runs inside the guest; the host test boots it once and runs them.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff_csi::csi;
use handoff_csi::export::node_host_nqn;
use handoff_csi::ids::NodeId;
use support::kernel_lab::{in_lab, Lab};
use support::lab_steps::*;
use support::*;

const PREFIX: &str = "nqn.2026-11.dev.handoff-csi:";
const CONFIGFS: &str = "/sys/kernel/config/nvmet";

#[test]
fn nvme_tcp_and_nvmet_on_a_real_kernel() {
    if std::env::var("HANDOFF_SKIP_KERNEL_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED nvme_tcp_and_nvmet_on_a_real_kernel: HANDOFF_SKIP_KERNEL_LAB=1");
        return;
    }
    let mut lab = Lab::prepare().unwrap_or_else(|e| {
        panic!(
            "the kernel lab cannot run: {e} (HANDOFF_SKIP_KERNEL_LAB=1 skips it on a workstation)"
        )
    });
    // Native NVMe multipath (the kernel's default): the namespace appears under its
    // subsystem's head device.
    let run = lab
        .run_tests(
            "nvme-multipath",
            &["guest_csi_lifecycle_on_nvmet"],
            Duration::from_secs(600),
        )
        .expect("lab boots");
    eprintln!(
        "kernel lab (multipath): guest ran {:?} (TCG; lab timing only)",
        run.elapsed
    );
    assert_eq!(run.exit, Some(0), "guest log:\n{}", run.log);
    assert_eq!(passed(&run.log), 1, "{}", run.log);
    // Plain (multipath=N): one device per controller, as two separate hosts have — the
    // only way two "nodes" in one kernel keep separate paths for the fence.
    lab.module_params = vec![("nvme-core.ko".into(), "multipath=N".into())];
    let run = lab
        .run_tests(
            "nvme-plain",
            &[
                "guest_csi_lifecycle_on_nvmet",
                "guest_the_fence_cuts_the_source_off",
                "guest_a_reconnect_during_the_eviction_is_refused",
                "guest_growth_and_a_lost_target",
                "guest_ext4_grows_online_where_cap_sys_resource_exists",
            ],
            Duration::from_secs(900),
        )
        .expect("lab boots");
    eprintln!(
        "kernel lab (plain): guest ran {:?} (TCG; lab timing only)",
        run.elapsed
    );
    assert_eq!(run.exit, Some(0), "guest log:\n{}", run.log);
    assert_eq!(passed(&run.log), 5, "{}", run.log);
    for line in run.log.lines().filter(|l| l.starts_with("lab: ")) {
        eprintln!("{line}");
    }
}

fn nvmet_args() -> Vec<String> {
    [
        "--backend",
        "nvmet",
        "--nvmet-configfs",
        CONFIGFS,
        "--nvmet-address",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec()
}

fn controllers_of(nqn: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/nvme")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_to_string(e.path().join("subsysnqn")).is_ok_and(|s| s.trim() == nqn)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn host(node: &str) -> String {
    node_host_nqn(&NodeId::parse(node).unwrap())
}

/// The whole CSI lifecycle on the kernel's nvmet and nvme-tcp.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (nvme_tcp_and_nvmet_on_a_real_kernel boots it)"]
async fn guest_csi_lifecycle_on_nvmet() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let d = Driver::start_with(DriverOptions {
        extra_args: nvmet_args(),
        ..Default::default()
    })
    .await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let v = c
        .create_volume(create_request("lab-disk", 64 << 20, rwx()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let nqn = format!("{PREFIX}{}", v.volume_id);
    let sub = Path::new(CONFIGFS).join("subsystems").join(&nqn);
    assert!(!sub.exists(), "exported only once published");
    let ctx = c
        .controller_publish_volume(publish_request(&v.volume_id, "node-a", rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["nvmeHostNqn"], host("node-a"));
    assert_eq!(
        std::fs::read_to_string(sub.join("attr_allow_any_host"))
            .unwrap()
            .trim(),
        "0",
        "no subsystem admits any host"
    );
    assert!(sub.join("allowed_hosts").join(host("node-a")).exists());
    let (staging, target) = (d.path("staging"), d.path("target"));
    std::fs::create_dir_all(&staging).unwrap();
    n.node_stage_volume(stage(&v.volume_id, &ctx, &staging))
        .await
        .unwrap();
    assert_eq!(controllers_of(&nqn).len(), 1, "one controller connected");
    n.node_publish_volume(publish_node(&v.volume_id, &ctx, &staging, &target))
        .await
        .unwrap();
    write_read(&target, 1 << 20, 0x5a).expect("O_DIRECT through the NVMe/TCP device");
    node_teardown(&mut n, &v.volume_id, &staging, &target)
        .await
        .unwrap();
    assert!(controllers_of(&nqn).is_empty(), "unstage disconnects");
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!sub.join("allowed_hosts").join(host("node-a")).exists());
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!sub.exists(), "delete unexports");
    assert!(
        !Path::new(CONFIGFS)
            .join("hosts")
            .join(host("node-a"))
            .exists(),
        "no host entry left behind"
    );
}

/// Node A (with the controller) and node B on one RWX block volume on nvmet, with a
/// 10 s `nvmeCtrlLossTmo`, as two nodes of a live migration.
async fn two_nodes_on_one_volume(name: &str) -> (Driver, Driver, csi::Volume) {
    let a = Driver::start_with(DriverOptions {
        extra_args: nvmet_args(),
        ..Default::default()
    })
    .await;
    let b = Driver::start_with(DriverOptions {
        mode: "node",
        node_id: "node-b".into(),
        data_dir: Some(a.data_dir()),
        ..Default::default()
    })
    .await;
    let mut params = create_request(name, 64 << 20, rwx());
    params
        .parameters
        .insert("nvmeCtrlLossTmo".into(), "10".into());
    let v = a
        .controller()
        .await
        .create_volume(params)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    (a, b, v)
}

/// Two nodes (two host NQNs) on one RWX block volume, as in a live migration; the
/// source does not tear its device down. After ControllerUnpublish(A) A's I/O fails and
/// it cannot reconnect, while B keeps reading A's last write and writing.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (nvme_tcp_and_nvmet_on_a_real_kernel boots it)"]
async fn guest_the_fence_cuts_the_source_off() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let (a, b, v) = two_nodes_on_one_volume("lab-migrating").await;
    let mut c = a.controller().await;
    let mut devices = Vec::new();
    for (d, node) in [(&a, "node-a"), (&b, "node-b")] {
        devices.push(
            attach_to(&a, d, node, &v.volume_id, &rwx(), "fence")
                .await
                .1,
        );
    }
    let (dev_a, dev_b) = (devices[0].clone(), devices[1].clone());
    write_read(&dev_a, 0, 0xa1).expect("A writes");
    write_read(&dev_b, 4096, 0xb1).expect("B writes");
    // A's last write, then the fence (A never unstaged).
    write_read(&dev_a, 8192, 0xa2).expect("A's last write");
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A may retry for ctrl_loss_tmo (10 s): its I/O must fail by then.
    let fenced_by = Instant::now() + Duration::from_secs(60);
    loop {
        if write_read(&dev_a, 12288, 0xa3).is_err() {
            break;
        }
        assert!(Instant::now() < fenced_by, "A still writes after its fence");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // B sees A's last write and keeps writing (it reconnects after the port cycle).
    let ok_by = Instant::now() + Duration::from_secs(60);
    loop {
        let f = open_direct(&dev_b).unwrap();
        let mut back = aligned(0);
        match f.read_exact_at(&mut back, 8192) {
            Ok(()) => {
                assert_eq!(back, aligned(0xa2), "B reads A's last write");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < ok_by, "B lost the volume: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    write_read(&dev_b, 16384, 0xb2).expect("B writes after A's fence");
    assert!(
        write_read(&dev_a, 12288, 0xa4).is_err(),
        "A cannot come back"
    );
    let nqn = format!("{PREFIX}{}", v.volume_id);
    let gone_by = Instant::now() + Duration::from_secs(60);
    while controllers_of(&nqn).len() > 1 {
        assert!(
            Instant::now() < gone_by,
            "A's controller never gave up: {:?}",
            controllers_of(&nqn)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(controllers_of(&nqn).len(), 1, "B's controller stays");
}

/// One Fabrics Connect of our own through /dev/nvme-fabrics (what a reconnecting kernel
/// or an operator's `nvme connect` does); the kernel's `instance=…` answer on success.
fn fabrics_connect(options: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/nvme-fabrics")?;
    f.write_all(options.as_bytes())?;
    let mut answer = String::new();
    f.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A's host keeps connecting to the subsystem while ControllerUnpublish(A) runs
/// (duplicate_connect: every success is a new controller). Once the call has returned no
/// attempt gets in, every controller A got before is cut off, and B keeps its own.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (nvme_tcp_and_nvmet_on_a_real_kernel boots it)"]
async fn guest_a_reconnect_during_the_eviction_is_refused() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    assert!(in_lab(), "a guest half of the kernel lab");
    let (a, b, v) = two_nodes_on_one_volume("lab-hammered").await;
    let mut c = a.controller().await;
    let dev_a = attach_to(&a, &a, "node-a", &v.volume_id, &rwx(), "hammer")
        .await
        .1;
    let dev_b = attach_to(&a, &b, "node-b", &v.volume_id, &rwx(), "hammer")
        .await
        .1;
    write_read(&dev_b, 0, 0xb1).expect("B writes");
    // The same publish again (idempotent) names the target A dials.
    let ctx = c
        .controller_publish_volume(publish_request(&v.volume_id, "node-a", rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let nqn = ctx["nvmeSubsystemNqn"].clone();
    let options = format!(
        "transport=tcp,traddr={},trsvcid={},nqn={nqn},hostnqn={},ctrl_loss_tmo=2,reconnect_delay=1,duplicate_connect",
        ctx["nvmeAddress"],
        ctx["nvmePort"],
        host("node-a")
    );
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let refused = Arc::new(Mutex::new(0u32));
    let hammer = {
        let (stop, admitted, refused) = (stop.clone(), admitted.clone(), refused.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match fabrics_connect(&options) {
                    Ok(_) => admitted.lock().unwrap().push(Instant::now()),
                    Err(_) => *refused.lock().unwrap() += 1,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let warm_by = Instant::now() + Duration::from_secs(30);
    while admitted.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < warm_by,
            "A's own connects never got in before the fence"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let fenced = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    hammer.join().unwrap();
    let admitted = admitted.lock().unwrap().clone();
    let late = admitted.iter().filter(|t| **t > fenced).count();
    let refused = *refused.lock().unwrap();
    assert_eq!(
        late, 0,
        "{late} of A's connects got in after ControllerUnpublish(A) returned"
    );
    assert!(refused > 0, "A kept trying after the fence");
    // Every controller A had (the plugin's and the hammer's) is cut off and goes away.
    let a_controllers = || {
        controllers_of(&nqn)
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(format!("/sys/class/nvme/{c}/hostnqn"))
                    .is_ok_and(|h| h.trim() == host("node-a"))
            })
            .collect::<Vec<_>>()
    };
    let gone_by = Instant::now() + Duration::from_secs(60);
    while !a_controllers().is_empty() {
        assert!(
            Instant::now() < gone_by,
            "A's controllers stayed: {:?}",
            a_controllers()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(write_read(&dev_a, 4096, 0xa9).is_err(), "A cannot write");
    let ok_by = Instant::now() + Duration::from_secs(60);
    while write_read(&dev_b, 8192, 0xb2).is_err() {
        assert!(Instant::now() < ok_by, "B lost the volume");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "lab: {} of A's own connects got in before the fence, {refused} refused during and after it, none after it returned",
        admitted.len()
    );
}

/// Growth reaches a connected node (revalidate_size), and `nvmeCtrlLossTmo` bounds a
/// lost target: the port goes, the device is gone after the timeout, NodeUnstage still
/// succeeds.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (nvme_tcp_and_nvmet_on_a_real_kernel boots it)"]
async fn guest_growth_and_a_lost_target() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let d = Driver::start_with(DriverOptions {
        extra_args: nvmet_args(),
        ..Default::default()
    })
    .await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let mut req = create_request("lab-grow", 32 << 20, rwx());
    req.parameters.insert("nvmeCtrlLossTmo".into(), "10".into());
    let v = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ctx = c
        .controller_publish_volume(publish_request(&v.volume_id, "node-a", rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let (staging, target) = (d.path("staging"), d.path("target"));
    std::fs::create_dir_all(&staging).unwrap();
    n.node_stage_volume(stage(&v.volume_id, &ctx, &staging))
        .await
        .unwrap();
    n.node_publish_volume(publish_node(&v.volume_id, &ctx, &staging, &target))
        .await
        .unwrap();
    let size = |p: &Path| {
        let f = std::fs::File::open(p).unwrap();
        nix::sys::stat::fstat(&f).unwrap();
        std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0)).unwrap()
    };
    assert_eq!(size(&target), 32 << 20);
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 0,
        }),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
    let grown_by = Instant::now() + Duration::from_secs(30);
    while size(&target) != 64 << 20 {
        assert!(Instant::now() < grown_by, "the node never saw the growth");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write_read(&target, (64 << 20) - 4096, 0x6e).expect("the new end is usable");
    // The target goes away (its port is removed, as when a storage host dies).
    let port = Path::new(CONFIGFS).join("ports/1/subsystems");
    let nqn = format!("{PREFIX}{}", v.volume_id);
    std::fs::remove_file(port.join(&nqn)).unwrap();
    let lost_at = Instant::now();
    let gone_by = Instant::now() + Duration::from_secs(90);
    while !controllers_of(&nqn).is_empty() {
        assert!(
            Instant::now() < gone_by,
            "the controller outlived ctrl_loss_tmo"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let waited = lost_at.elapsed();
    assert!(
        waited >= Duration::from_secs(8),
        "gave up before ctrl_loss_tmo: {waited:?}"
    );
    eprintln!("lab: controller removed {waited:?} after its target was lost (ctrl_loss_tmo 10 s)");
    assert!(
        write_read(&target, 0, 1).is_err(),
        "no I/O to a lost target"
    );
    node_teardown(&mut n, &v.volume_id, &staging, &target)
        .await
        .expect("unstage succeeds after the target is gone");
}

/// ext4 online growth needs CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS), which the host
/// machines withhold; the guest's root has it. NodeExpandVolume after NodePublish grows
/// the mounted filesystem, and what was written stays.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (nvme_tcp_and_nvmet_on_a_real_kernel boots it)"]
async fn guest_ext4_grows_online_where_cap_sys_resource_exists() {
    assert!(in_lab(), "a guest half of the kernel lab");
    assert!(
        handoff_csi::node::mount::has_capability(handoff_csi::node::mount::CAP_SYS_RESOURCE),
        "the guest's root has CAP_SYS_RESOURCE"
    );
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let cap = rwo_mount("ext4");
    let v = c
        .create_volume(create_request("lab-ext4", 64 << 20, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ctx = c
        .controller_publish_volume(publish_request(&v.volume_id, "node-a", cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let (staging, target) = (d.path("staging"), d.path("target"));
    std::fs::create_dir_all(&staging).unwrap();
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::write(target.join("keep"), b"still here").unwrap();
    let total = |p: &Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        s.blocks() as u64 * s.fragment_size() as u64
    };
    let before = total(&target);
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 192 << 20,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let grown = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("ext4 grows online with CAP_SYS_RESOURCE")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 192 << 20);
    let after = total(&target);
    assert!(after > before + (100 << 20), "{before} → {after}");
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"still here");
    eprintln!("lab: ext4 grew online {before} → {after} bytes");
    node_teardown(&mut n, &v.volume_id, &staging, &target)
        .await
        .unwrap();
}

#[test]
#[ignore = "debugging aid: boots the lab with a shell script from HANDOFF_LAB_SCRIPT"]
fn lab_shell() {
    let mut lab = Lab::prepare().unwrap();
    // Programs of your own for the guest, colon-separated host paths.
    lab.extra = std::env::var("HANDOFF_LAB_EXTRA")
        .map(|v| {
            v.split(':')
                .filter(|p| !p.is_empty())
                .map(Into::into)
                .collect()
        })
        .unwrap_or_default();
    let script = std::env::var("HANDOFF_LAB_SCRIPT").unwrap_or_else(|_| "ls /".into());
    let run = lab
        .boot("shell", &script, Duration::from_secs(300))
        .unwrap();
    println!("{}", run.log);
}
