//! The NBD data plane through the CSI socket: a controller serving the NBD target and
//! two node plugins attaching over it (nbd-client + FUSE + loop device), a live
//! migration, and the fence: once ControllerUnpublish(source) returns, the source's
//! block device fails every write with EIO while the target reads every block. Needs root.

mod support;

use std::os::unix::fs::FileExt;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use handoff_csi::datacheck::{self, AlignedBuf, BLOCK};
use support::steps::{attach, detach};
use support::*;

const BLOCKS: u64 = 1024; // 4 MiB

async fn nbd_cluster() -> LocalCluster {
    let port = free_port();
    LocalCluster::start(
        &["node-a", "node-b"],
        vec!["--nbd-listen".into(), format!("127.0.0.1:{port}")],
    )
    .await
}

async fn nbd_disk(cluster: &LocalCluster, name: &str) -> String {
    support::steps::nbd_disk(cluster, name, BLOCKS as i64 * BLOCK as i64).await
}

#[tokio::test]
async fn migration_over_nbd_fences_the_source_at_the_target() {
    if !require_root("migration_over_nbd_fences_the_source_at_the_target") {
        return;
    }
    let cluster = nbd_cluster().await;
    let id = nbd_disk(&cluster, "nbd-vm").await;
    let a = attach(&cluster, &id, "node-a").await;
    let dev_a = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev_a, 0, BLOCKS, 1).unwrap();
    // Its block device is a loop device over the FUSE disk, not over the image file.
    let backing = loops_under(&cluster.node("node-a").dir.path().join("nbd"));
    assert_eq!(backing.len(), 1, "one loop device over node-a's NBD disk");

    // Migration: B attaches while A still writes; B sees every block.
    let b = attach(&cluster, &id, "node-b").await;
    let dev_b = datacheck::open_direct(&b.target, true).unwrap();
    datacheck::verify_blocks(&dev_b, &vec![1; BLOCKS as usize]).unwrap();

    // Hand-off done: A is detached at the controller (as after a force-detach, before
    // any NodeUnstage on A). A leftover writer on A must not reach the disk any more.
    let started = std::time::Instant::now();
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
    let fence = started.elapsed();
    let mut buf = AlignedBuf::new(BLOCK);
    datacheck::fill_block(buf.as_mut_slice(), 0, 99);
    let late = dev_a.write_at(buf.as_slice(), 0);
    let err = late.expect_err("the fenced source wrote through its block device");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        dev_a.read_at(buf.as_mut_slice(), 0).is_err(),
        "reads fail too"
    );

    // The target has every block, and keeps writing.
    datacheck::verify_blocks(&dev_b, &vec![1; BLOCKS as usize]).unwrap();
    datacheck::write_blocks(&dev_b, 0, 16, 2).unwrap();
    let mut expected = vec![1; BLOCKS as usize];
    expected[..16].fill(2);
    datacheck::verify_blocks(&dev_b, &expected).unwrap();
    eprintln!("fence: ControllerUnpublish(node-a) returned after {fence:?}");

    // Kubernetes cleans up A later: NodeUnpublish/NodeUnstage still succeed on a fenced
    // node, and nothing is left behind on either node.
    drop(dev_a);
    drop(dev_b);
    detach(&cluster, &id, &a).await;
    detach(&cluster, &id, &b).await;
    for node in ["node-a", "node-b"] {
        let dir = cluster.node(node).dir.path().join("nbd");
        assert!(loops_under(&dir).is_empty(), "{node}: loop device left");
        assert!(mounts_under(&dir).is_empty(), "{node}: FUSE mount left");
    }
}

#[tokio::test]
async fn node_plugin_restart_keeps_nbd_io_running_and_adopts_the_device() {
    if !require_root("node_plugin_restart_keeps_nbd_io_running_and_adopts_the_device") {
        return;
    }
    let mut cluster = nbd_cluster().await;
    let id = nbd_disk(&cluster, "nbd-restart").await;
    let a = attach(&cluster, &id, "node-a").await;
    let dev = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev, 0, 256, 1).unwrap();
    // SIGKILL the plugin: its nbd-client keeps serving the disk.
    cluster.node_mut("node-a").crash_and_restart().await;
    datacheck::write_blocks(&dev, 256, 256, 1).unwrap();
    let mut expected = vec![0; BLOCKS as usize];
    expected[..512].fill(1);
    datacheck::verify_blocks(&dev, &expected[..512]).unwrap();
    // The restarted plugin finds the device: a repeated NodeStage is idempotent and
    // unpublish/unstage release it.
    let again = attach(&cluster, &id, "node-a").await;
    assert_eq!(again.target, a.target);
    drop(dev);
    detach(&cluster, &id, &a).await;
    let dir = cluster.node("node-a").dir.path().join("nbd");
    assert!(loops_under(&dir).is_empty());
    assert!(mounts_under(&dir).is_empty());
}

/// A controller on a "storage host" and node plugins on "node hosts": network namespaces
/// joined by veth pairs, so every NBD byte crosses a (virtual) network link.
async fn netns_cluster(lab: &netns::NetLab, nodes: &[&str]) -> LocalCluster {
    let shared = tempfile::Builder::new()
        .prefix("handoff-test-shared-")
        .tempdir()
        .unwrap();
    let data = std::fs::canonicalize(shared.path()).unwrap().join("data");
    let controller = Driver::start_with(DriverOptions {
        mode: "controller",
        node_id: "controller".into(),
        extra_args: vec![
            "--nbd-listen".into(),
            "0.0.0.0:10809".into(),
            "--nbd-advertise".into(),
            format!("{}:10809", netns::TARGET_IP),
        ],
        data_dir: Some(data.clone()),
        netns: Some(lab.target_ns()),
        ..Default::default()
    })
    .await;
    let mut drivers = Vec::new();
    for name in nodes {
        drivers.push(
            Driver::start_with(DriverOptions {
                mode: "node",
                node_id: name.to_string(),
                extra_args: vec!["--nbd-io-timeout".into(), "20s".into()],
                data_dir: Some(data.clone()),
                netns: Some(lab.node_ns(name)),
                ..Default::default()
            })
            .await,
        );
    }
    LocalCluster {
        controller,
        nodes: drivers,
        shared,
    }
}

#[tokio::test]
async fn across_network_namespaces_io_survives_a_link_flap_grows_and_fences_the_source() {
    if !require_root(
        "across_network_namespaces_io_survives_a_link_flap_grows_and_fences_the_source",
    ) {
        return;
    }
    let lab = netns::NetLab::new(&["node-a", "node-b"]);
    let cluster = netns_cluster(&lab, &["node-a", "node-b"]).await;
    let id = nbd_disk(&cluster, "nbd-netns").await;
    let a = attach(&cluster, &id, "node-a").await;
    let dev_a = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev_a, 0, BLOCKS / 2, 1).unwrap();

    // The node's link goes down for 3 s while the VM writes: its writes wait, then
    // complete once the link is back; nothing is lost.
    lab.set_link("node-a", false);
    let writer = {
        let dev = dev_a.try_clone().unwrap();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            datacheck::write_blocks(&dev, BLOCKS / 2, BLOCKS / 2, 1).map(|_| started.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    lab.set_link("node-a", true);
    let waited = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap()
        .expect("writes complete after the link comes back");
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "the writes should have waited for the link ({waited:?})"
    );
    datacheck::verify_blocks(&dev_a, &vec![1; BLOCKS as usize]).unwrap();

    // Expansion reaches the node: the loop device over the NBD disk grows online.
    let new_size = 2 * BLOCKS as i64 * BLOCK as i64;
    cluster
        .controller
        .controller()
        .await
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: new_size,
                limit_bytes: 0,
            }),
            volume_capability: Some(block_cap(Mode::MultiNodeMultiWriter)),
            ..Default::default()
        })
        .await
        .unwrap();
    let grown = cluster
        .node("node-a")
        .node()
        .await
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: a.target.display().to_string(),
            staging_target_path: a.staging.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .capacity_bytes;
    assert_eq!(grown, new_size);
    assert_eq!(
        handoff_csi::node::mount::block_device_size(&a.target).unwrap(),
        new_size as u64
    );

    // Migration to node-b, then the source is fenced at the target.
    let b = attach(&cluster, &id, "node-b").await;
    let dev_b = datacheck::open_direct(&b.target, true).unwrap();
    datacheck::verify_blocks(&dev_b, &vec![1; BLOCKS as usize]).unwrap();
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
    let mut buf = AlignedBuf::new(BLOCK);
    datacheck::fill_block(buf.as_mut_slice(), 3, 9);
    let err = dev_a
        .write_at(buf.as_slice(), 3 * BLOCK as u64)
        .expect_err("the fenced source wrote across the network");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    datacheck::write_blocks(&dev_b, BLOCKS, 16, 2).unwrap();
    let mut expected = vec![1; BLOCKS as usize];
    expected.extend(std::iter::repeat_n(2, 16));
    datacheck::verify_blocks(&dev_b, &expected).unwrap();

    drop(dev_a);
    drop(dev_b);
    detach(&cluster, &id, &a).await;
    detach(&cluster, &id, &b).await;
    for node in ["node-a", "node-b"] {
        let dir = cluster.node(node).dir.path().join("nbd");
        assert!(loops_under(&dir).is_empty(), "{node}: loop device left");
        assert!(mounts_under(&dir).is_empty(), "{node}: FUSE mount left");
    }
}

/// Parent pid of `pid`, from /proc.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its closing parenthesis.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every process started (transitively) by `root`.
fn descendants(root: i32) -> Vec<i32> {
    let all: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|p| ppid(**p) == Some(parent)));
        i += 1;
    }
    found.remove(0);
    found
}

/// Processes whose command line contains every one of `words`.
fn processes_with(words: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            words.iter().all(|w| cmd.contains(w)).then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn with_an_nbd_keeper_io_survives_the_plugin_container_and_all_it_started() {
    if !require_root("with_an_nbd_keeper_io_survives_the_plugin_container_and_all_it_started") {
        return;
    }
    let keeper_dir = tempfile::Builder::new()
        .prefix("handoff-test-keeper-")
        .tempdir()
        .unwrap();
    let run_dir = std::fs::canonicalize(keeper_dir.path())
        .unwrap()
        .join("nbd");
    let socket = keeper_dir.path().join("keeper.sock");
    let mut keeper = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .arg("nbd-keeper")
        .arg("--socket")
        .arg(&socket)
        .arg("--run-dir")
        .arg(&run_dir)
        .env("HANDOFF_LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let shared = tempfile::Builder::new()
        .prefix("handoff-test-shared-")
        .tempdir()
        .unwrap();
    let data = std::fs::canonicalize(shared.path()).unwrap().join("data");
    let port = free_port();
    let controller = Driver::start_with(DriverOptions {
        mode: "controller",
        node_id: "controller".into(),
        extra_args: vec!["--nbd-listen".into(), format!("127.0.0.1:{port}")],
        data_dir: Some(data.clone()),
        ..Default::default()
    })
    .await;
    let node = Driver::start_with(DriverOptions {
        mode: "node",
        node_id: "node-a".into(),
        extra_args: vec![
            "--nbd-keeper-socket".into(),
            socket.display().to_string(),
            "--nbd-run-dir".into(),
            run_dir.display().to_string(),
        ],
        data_dir: Some(data),
        ..Default::default()
    })
    .await;
    let mut cluster = LocalCluster {
        controller,
        nodes: vec![node],
        shared,
    };
    let id = nbd_disk(&cluster, "nbd-keeper").await;
    let a = attach(&cluster, &id, "node-a").await;
    let dev = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev, 0, 256, 1).unwrap();

    // The client belongs to the keeper, not to the plugin.
    let clients = processes_with(&["nbd-client", &run_dir.display().to_string()]);
    assert_eq!(clients.len(), 1, "one nbd-client: {clients:?}");
    assert_eq!(ppid(clients[0]), keeper.id().map(|p| p as i32));

    // A container restart: the plugin and everything it started are killed.
    let plugin = cluster.node("node-a").pid() as i32;
    for pid in descendants(plugin) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    cluster.node_mut("node-a").crash_and_restart().await;
    datacheck::write_blocks(&dev, 256, 256, 1).unwrap();
    let expected = vec![1; 512];
    datacheck::verify_blocks(&dev, &expected).unwrap();

    drop(dev);
    detach(&cluster, &id, &a).await;
    assert!(loops_under(&run_dir).is_empty());
    assert!(mounts_under(&run_dir).is_empty());
    let _ = keeper.kill().await;
}
