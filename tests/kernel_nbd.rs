//! The NBD data plane through the kernel's own nbd driver (Debian's 6.1 under QEMU, see
//! support/kernel_lab.rs): a controller serving the NBD target and node plugins with
//! `--nbd-client kernel`, so every published volume is a `/dev/nbd<N>` driven by nbd.ko
//! over netlink. The lifecycle and online growth, the fence (the source's I/O fails, its
//! reconnect is refused, the target keeps every block), and link loss: a stalled target
//! within the I/O timeout costs nothing, beyond it I/O fails with EIO instead of hanging,
//! and the link comes back by itself; a supervisor killed and adopted changes nothing.
//! Each `guest_*` test runs inside the guest; the host test boots it once.

mod support;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use handoff_csi::csi;
use handoff_csi::datacheck::{self, AlignedBuf, BLOCK};
use handoff_csi::nbd::node::kernel::{SupervisorFiles, SupervisorState, SysBlock};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::kernel_lab::{in_lab, Lab};
use support::steps::{attach, detach};
use support::*;

const BLOCKS: u64 = 1024; // 4 MiB
const NBD_MAJOR: u64 = 43;

#[test]
fn kernel_nbd_on_a_real_kernel() {
    if std::env::var("HANDOFF_SKIP_KERNEL_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED kernel_nbd_on_a_real_kernel: HANDOFF_SKIP_KERNEL_LAB=1");
        return;
    }
    let lab = Lab::prepare().unwrap_or_else(|e| {
        panic!(
            "the kernel lab cannot run: {e} (HANDOFF_SKIP_KERNEL_LAB=1 skips it on a workstation)"
        )
    });
    let tests = [
        "guest_kernel_nbd_lifecycle_and_growth",
        "guest_kernel_nbd_fence_cuts_the_source_off",
        "guest_kernel_nbd_link_loss_and_recovery",
    ];
    let run = lab
        .run_tests("kernel-nbd", &tests, Duration::from_secs(600))
        .expect("lab boots");
    eprintln!(
        "kernel lab (nbd): guest ran {:?} (TCG; lab timing only)",
        run.elapsed
    );
    assert_eq!(run.exit, Some(0), "guest log:\n{}", run.log);
    assert_eq!(
        run.log
            .matches("test result: ok. 1 passed; 0 failed")
            .count(),
        tests.len(),
        "{}",
        run.log
    );
    for line in run.log.lines().filter(|l| l.starts_with("lab: ")) {
        eprintln!("{line}");
    }
}

async fn kernel_cluster(node_args: &[&str]) -> LocalCluster {
    let port = free_port();
    let mut args = vec!["--nbd-client".to_owned(), "kernel".to_owned()];
    args.extend(node_args.iter().map(|a| a.to_string()));
    LocalCluster::start_with(
        &["node-a", "node-b"],
        vec!["--nbd-listen".into(), format!("127.0.0.1:{port}")],
        args,
    )
    .await
}

async fn nbd_disk(cluster: &LocalCluster, name: &str) -> String {
    support::steps::nbd_disk(cluster, name, BLOCKS as i64 * BLOCK as i64).await
}

/// The kernel nbd devices a node plugin made (backend `handoff-csi:<node>/…`).
fn devices_of(node: &str) -> Vec<(u32, String)> {
    SysBlock::default()
        .with_prefix(&format!("handoff-csi:{node}/"))
        .unwrap()
}

fn supervisor(cluster: &LocalCluster, node: &str, id: &str) -> SupervisorFiles {
    SupervisorFiles::new(&cluster.node(node).dir.path().join("nbd").join(id))
}

fn state(files: &SupervisorFiles) -> SupervisorState {
    files
        .state()
        .unwrap()
        .expect("the supervisor published its state")
}

fn gone(pid: u32) -> bool {
    // Reaped by the plugin; a zombie would still show as a directory.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stage, publish, O_DIRECT data on /dev/nbd<N>, online growth (the supervisor asks the
/// target and resizes the device), teardown (device released, supervisor gone).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (kernel_nbd_on_a_real_kernel boots it)"]
async fn guest_kernel_nbd_lifecycle_and_growth() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let cluster = kernel_cluster(&[]).await;
    let id = nbd_disk(&cluster, "knbd-disk").await;
    let a = attach(&cluster, &id, "node-a").await;
    let rdev = std::fs::metadata(&a.target).unwrap().rdev();
    assert_eq!(
        nix::sys::stat::major(rdev),
        NBD_MAJOR,
        "the published device is the kernel's nbd device"
    );
    let devices = devices_of("node-a");
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert!(devices[0].1.ends_with(&id), "{devices:?}");
    let files = supervisor(&cluster, "node-a", &id);
    assert!(files.supervised().unwrap(), "a live supervisor");
    let pid = state(&files).pid;
    let dev = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev, 0, BLOCKS, 1).unwrap();
    datacheck::verify_blocks(&dev, &vec![1; BLOCKS as usize]).unwrap();

    let grown = 2 * BLOCKS as i64 * BLOCK as i64;
    let r = cluster
        .controller
        .controller()
        .await
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: grown,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    let n = cluster
        .node("node-a")
        .node()
        .await
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: a.target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.capacity_bytes, grown);
    assert_eq!(
        SysBlock::default().size(devices[0].0).unwrap(),
        grown as u64,
        "the device grew online"
    );
    datacheck::write_blocks(&dev, BLOCKS, BLOCKS, 2).unwrap();
    let mut expected = vec![1; BLOCKS as usize];
    expected.extend(vec![2; BLOCKS as usize]);
    datacheck::verify_blocks(&dev, &expected).unwrap();
    eprintln!(
        "lab: kernel nbd{} grew online to {grown} bytes",
        devices[0].0
    );

    // Why deploy/ runs the node plugin and the keeper with hostNetwork: nbd.ko's
    // netlink family exists only in the host's network namespace.
    let in_pod_netns = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        handoff_csi::nbd::node::netlink::NbdNetlink::open().map(drop)
    })
    .join()
    .unwrap();
    assert_eq!(
        in_pod_netns
            .expect_err("nbd netlink in a network namespace of its own")
            .kind(),
        std::io::ErrorKind::NotFound
    );

    drop(dev);
    detach(&cluster, &id, &a).await;
    assert!(
        devices_of("node-a").is_empty(),
        "unstage releases the device"
    );
    wait_until("the supervisor exits", Duration::from_secs(5), || gone(pid));
    assert!(files.state().unwrap().is_none(), "its state is removed");
}

/// Two nodes on one RWX block volume over kernel NBD, as in a live migration; the source
/// never tears its device down. After ControllerUnpublish(A), A's I/O fails with EIO at
/// once and for good (its supervisor's reconnect is refused), B has every block.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (kernel_nbd_on_a_real_kernel boots it)"]
async fn guest_kernel_nbd_fence_cuts_the_source_off() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let cluster = kernel_cluster(&["--nbd-io-timeout", "20s"]).await;
    let id = nbd_disk(&cluster, "knbd-migrating").await;
    let a = attach(&cluster, &id, "node-a").await;
    let dev_a = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev_a, 0, BLOCKS, 1).unwrap();
    let b = attach(&cluster, &id, "node-b").await;
    let dev_b = datacheck::open_direct(&b.target, true).unwrap();
    datacheck::verify_blocks(&dev_b, &vec![1; BLOCKS as usize]).unwrap();
    // A's last write, seen by B.
    datacheck::write_blocks(&dev_a, 0, 8, 2).unwrap();
    let files_a = supervisor(&cluster, "node-a", &id);
    let pid_a = state(&files_a).pid;

    cluster
        .controller
        .controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = AlignedBuf::new(BLOCK);
    datacheck::fill_block(buf.as_mut_slice(), 0, 99);
    let late = dev_a
        .write_at(buf.as_slice(), 0)
        .and_then(|_| dev_a.sync_data());
    let err = late.expect_err("the fenced source wrote through its kernel nbd device");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let failed_after = started.elapsed();
    // A refusal is final: well before the 20 s I/O timeout, not after it.
    assert!(
        failed_after < Duration::from_secs(10),
        "A's I/O failed only after {failed_after:?}"
    );
    wait_until(
        "A's supervisor gives up after the refusal",
        Duration::from_secs(10),
        || gone(pid_a),
    );
    let log = std::fs::read_to_string(
        cluster
            .node("node-a")
            .dir
            .path()
            .join("nbd")
            .join(format!("{id}.log")),
    )
    .unwrap();
    assert!(log.contains("refused this node"), "{log}");
    assert!(
        dev_a.read_at(buf.as_mut_slice(), 0).is_err(),
        "reads fail too"
    );
    eprintln!(
        "lab: kernel nbd source fenced; its I/O failed {failed_after:?} after ControllerUnpublish"
    );

    let mut expected = vec![1; BLOCKS as usize];
    expected[..8].fill(2);
    datacheck::verify_blocks(&dev_b, &expected).unwrap();
    datacheck::write_blocks(&dev_b, 8, 8, 3).unwrap();
    expected[8..16].fill(3);
    datacheck::verify_blocks(&dev_b, &expected).unwrap();

    // Kubernetes cleans up A later: NodeUnpublish/NodeUnstage succeed on a fenced node.
    drop(dev_a);
    drop(dev_b);
    detach(&cluster, &id, &a).await;
    detach(&cluster, &id, &b).await;
    assert!(devices_of("node-a").is_empty() && devices_of("node-b").is_empty());
}

/// Runs a 4-block write of `generation` at `first` on a thread; returns its outcome and
/// how long it took.
fn write_in_background(
    path: &Path,
    first: u64,
    generation: u64,
) -> std::thread::JoinHandle<(std::io::Result<()>, Duration)> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let started = Instant::now();
        let r = datacheck::open_direct(&path, true)
            .and_then(|dev| datacheck::write_blocks(&dev, first, 4, generation));
        (r, started.elapsed())
    })
}

/// The target stalls (SIGSTOP) and restarts under a node with an 8 s I/O timeout:
/// - a supervisor killed meanwhile leaves I/O running, and a repeated NodeStage starts
///   one that adopts the device;
/// - a 5 s stall (the connection is declared dead at 4 s and re-dialled) costs nothing;
/// - a 16 s stall fails the I/O with EIO about the timeout (timer slack allowed), never
///   when the target is back, and once the
///   target answers again the link comes back by itself;
/// - a restarted target (same key, same attachments) is reconnected to.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (kernel_nbd_on_a_real_kernel boots it)"]
async fn guest_kernel_nbd_link_loss_and_recovery() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let mut cluster = kernel_cluster(&["--nbd-io-timeout", "8s"]).await;
    let id = nbd_disk(&cluster, "knbd-links").await;
    let a = attach(&cluster, &id, "node-a").await;
    let dev = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev, 0, 64, 1).unwrap();

    // The supervisor dies; the kernel keeps the connection and I/O goes on.
    let files = supervisor(&cluster, "node-a", &id);
    let first = state(&files).pid;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    wait_until("the supervisor dies", Duration::from_secs(5), || {
        gone(first)
    });
    datacheck::write_blocks(&dev, 64, 64, 1).unwrap();
    // A repeated NodeStage finds the device and starts a supervisor that adopts it.
    let again = attach(&cluster, &id, "node-a").await;
    assert_eq!(again.target, a.target);
    assert!(files.supervised().unwrap(), "a supervisor again");
    let second = state(&files).pid;
    assert_ne!(second, first);
    assert_eq!(devices_of("node-a").len(), 1, "the same device, adopted");

    let target_pid = Pid::from_raw(cluster.controller.pid() as i32);
    // Within the timeout: the write waits for the target and succeeds.
    kill(target_pid, Signal::SIGSTOP).unwrap();
    let w = write_in_background(&a.target, 128, 2);
    std::thread::sleep(Duration::from_secs(5));
    kill(target_pid, Signal::SIGCONT).unwrap();
    let (r, took) = w.join().unwrap();
    r.expect("a write across a 5 s stall succeeds");
    assert!(took >= Duration::from_secs(4), "it did wait: {took:?}");
    eprintln!("lab: kernel nbd write across a 5 s target stall took {took:?}");

    // Beyond it: EIO by the timeout, then recovery once the target answers.
    kill(target_pid, Signal::SIGSTOP).unwrap();
    let w = write_in_background(&a.target, 132, 3);
    let (r, took) = w.join().unwrap();
    let still_stopped = took < Duration::from_secs(16);
    std::thread::sleep(Duration::from_secs(16).saturating_sub(took));
    kill(target_pid, Signal::SIGCONT).unwrap();
    let err = r.expect_err("a write across a 16 s stall fails");
    assert!(
        still_stopped,
        "the write only failed after {took:?}, when the target was back"
    );
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        // The kernel's request and dead-connection timers add their slack (9.2 s
        // measured); a loaded TCG guest adds more.
        took <= Duration::from_secs(8 + 4),
        "EIO after {took:?}, well beyond the 8 s I/O timeout"
    );
    eprintln!("lab: kernel nbd write during a 16 s stall failed with EIO after {took:?}");
    // Blocks 132..136 are undefined now, as after any failed write: the stalled target
    // may still apply it when it resumes.
    let back = Instant::now();
    wait_until("I/O recovers", Duration::from_secs(30), || {
        datacheck::open_direct(&a.target, true)
            .and_then(|d| datacheck::write_blocks(&d, 136, 4, 4))
            .is_ok()
    });
    eprintln!(
        "lab: kernel nbd I/O back {:?} after the target resumed",
        back.elapsed()
    );

    // The target restarts: the supervisor reconnects, nothing fails.
    cluster.controller.crash_and_restart().await;
    let w = write_in_background(&a.target, 140, 5);
    let (r, took) = w.join().unwrap();
    r.expect("I/O goes on across a target restart");
    eprintln!("lab: kernel nbd write across a target restart took {took:?}");

    let mut expected = vec![1; 128];
    expected.extend([2; 4]);
    datacheck::verify_blocks(&dev, &expected).unwrap();
    for (first, generation) in [(136, 4), (140, 5)] {
        let mut buf = AlignedBuf::new(BLOCK);
        for index in first..first + 4 {
            dev.read_exact_at(buf.as_mut_slice(), index * BLOCK as u64)
                .unwrap();
            datacheck::check_block(buf.as_slice(), index, Some(generation)).unwrap();
        }
    }
    assert_eq!(state(&files).pid, second, "one supervisor throughout");
    drop(dev);
    detach(&cluster, &id, &a).await;
    assert!(devices_of("node-a").is_empty());
}
