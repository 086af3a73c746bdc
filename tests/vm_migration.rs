//! A running VM live-migrated by real QEMU between two node plugins, in KubeVirt's order:
//! ControllerPublish(B), NodeStage/NodePublish(B), QEMU B `-incoming` on B's device,
//! `migrate` over QMP, QEMU A ends, NodeUnpublish/NodeUnstage(A), ControllerUnpublish(A).
//! The guest (Debian's kernel, busybox) writes every block of its disk with a
//! generation stamp using O_DIRECT, syncs, reads every block back and checks it, round
//! after round; its expectations live in guest RAM and migrate with it. Four migrations
//! ping-pong, then one cancelled (target killed mid-way) leaves the VM verifying on its
//! source. The disk is the file plane's published block device (a loop device over the
//! shared image, direct I/O, cache=none in QEMU).

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use handoff_csi::lab::{workload_script, Vm};
use serde_json::{json, Value};
use support::kernel_lab::Lab;
use support::steps::{attach, detach, Attached};
use support::*;

const BLOCKS: u32 = 64;

/// One VM scenario at a time: each runs up to three TCG guests, and two cores shared by
/// several would stretch every timeout.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn qemu_live_migrates_a_running_vm_between_two_node_plugins() {
    if !require_root("qemu_live_migrates_a_running_vm_between_two_node_plugins") {
        return;
    }
    ping_pong(Plane::File).await;
}

/// The same over the NBD plane: each node's disk is its NBD connection to the
/// controller's target (FUSE client, loop device over it); the source is fenced at the
/// target when it is unpublished.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_live_migrates_a_running_vm_over_the_nbd_plane() {
    if !require_root("qemu_live_migrates_a_running_vm_over_the_nbd_plane") {
        return;
    }
    ping_pong(Plane::Nbd).await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Plane {
    File,
    Nbd,
}

async fn ping_pong(plane: Plane) {
    let _one = ONE_AT_A_TIME.lock().await;
    if std::env::var("HANDOFF_SKIP_KERNEL_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED the {plane:?}-plane VM migration: HANDOFF_SKIP_KERNEL_LAB=1");
        return;
    }
    let lab =
        Lab::prepare().unwrap_or_else(|e| panic!("the VM migration needs the kernel lab: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let kernel = &lab.kernel;
    let initrd = kernel
        .vm_initrd(&dir.path().join("initrd"), &workload_script(BLOCKS))
        .expect("VM initramfs");
    let controller_args = match plane {
        Plane::File => vec![],
        Plane::Nbd => vec!["--nbd-listen".into(), format!("127.0.0.1:{}", free_port())],
    };
    let cl = LocalCluster::start(&["node-a", "node-b"], controller_args).await;
    let on = match plane {
        Plane::File => "file",
        Plane::Nbd => "nbd",
    };
    let vol = support::steps::disk(&cl, "vm-root", 16 * MIB, on).await;
    let start = |disk: &PathBuf, name: &str, incoming: Option<u16>| {
        Vm::start(kernel, &initrd, disk, dir.path(), name, incoming).expect("QEMU starts")
    };
    let mut attached: HashMap<&str, Attached> = HashMap::new();
    attached.insert("node-a", attach(&cl, &vol, "node-a").await);
    let mut vm = start(&attached["node-a"].target, "on-node-a", None);
    let mut round = vm.wait_rounds_past(1, Duration::from_secs(180)).unwrap();
    let mut on = "node-a";
    let mut timings = Vec::new();
    for hop in 0..4 {
        let to = if on == "node-a" { "node-b" } else { "node-a" };
        attached.insert(to, attach(&cl, &vol, to).await);
        let port = free_port();
        let target = start(
            &attached[to].target,
            &format!("hop{hop}-on-{to}"),
            Some(port),
        );
        let done = vm.migrate(port, Duration::from_secs(300)).unwrap();
        assert_eq!(done["status"], "completed", "hop {hop}: {done}");
        timings.push((
            done["total-time"].as_u64().unwrap_or(0),
            done["downtime"].as_u64().unwrap_or(0),
        ));
        let before = vm.last_round();
        let _ = vm.qmp("quit", Value::Null);
        let (_, failed) = vm.rounds();
        assert!(failed.is_empty(), "source {}: {failed:?}", vm.name);
        drop(std::mem::replace(&mut vm, target));
        let a = attached.remove(on).unwrap();
        detach(&cl, &vol, &a).await;
        if plane == Plane::Nbd {
            // The source was cut off at the NBD target, not only forgotten.
            let table = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
                .args(["attachments", "--output", "json", "--state-dir"])
                .arg(cl.controller.state_dir())
                .output()
                .unwrap();
            let report: Value = serde_json::from_slice(&table.stdout).unwrap();
            let fenced = report["volumes"][0]["fenced"].to_string();
            assert!(
                fenced.contains(on) && fenced.contains("target"),
                "hop {hop}: {on} not fenced at the target: {report}"
            );
        }
        // The guest goes on verifying on the target, its expectations intact.
        round = vm
            .wait_rounds_past(before.max(round) + 1, Duration::from_secs(180))
            .unwrap();
        on = to;
    }
    // A cancelled migration: the target dies before it completes; the VM stays where it
    // is and keeps verifying.
    let to = if on == "node-a" { "node-b" } else { "node-a" };
    attached.insert(to, attach(&cl, &vol, to).await);
    let port = free_port();
    let mut doomed = start(&attached[to].target, "cancelled", Some(port));
    // Slow enough that the target dies mid-way.
    let capped = vm
        .qmp(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1_000_000}),
        )
        .unwrap();
    assert!(capped.get("error").is_none(), "{capped}");
    // Once the target listens (a refused connect is no migration at all).
    loop {
        vm.qmp("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let r = vm.qmp("query-migrate", Value::Null).unwrap();
        if matches!(r["return"]["status"].as_str(), Some("active" | "setup")) {
            break;
        }
        assert!(
            r["return"]["error-desc"]
                .as_str()
                .is_some_and(|e| e.contains("Connection refused")),
            "{r}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    doomed.kill();
    let ended = vm.wait_migration(Duration::from_secs(120)).unwrap();
    assert_ne!(ended["status"], "completed", "{ended}");
    let status = vm.qmp("query-status", Value::Null).unwrap();
    assert_eq!(status["return"]["status"], "running", "{status}");
    let a = attached.remove(to).unwrap();
    detach(&cl, &vol, &a).await;
    let last = vm
        .wait_rounds_past(round.max(vm.last_round()), Duration::from_secs(180))
        .unwrap();
    eprintln!(
        "VM live migration over the {plane:?} plane (TCG, lab timings only): 4 hops, (total ms, downtime ms) = {timings:?}; guest verified up to round {last}; cancelled hop left it running on {on}"
    );
    drop(vm);
    let a = attached.remove(on).unwrap();
    detach(&cl, &vol, &a).await;
}

/// `demo migration --vm` for a person: the same real-VM migration, printed as a timeline.
#[tokio::test(flavor = "multi_thread")]
async fn the_vm_demo_migrates_a_running_guest_and_says_so() {
    if !require_root("the_vm_demo_migrates_a_running_guest_and_says_so") {
        return;
    }
    if std::env::var("HANDOFF_SKIP_KERNEL_LAB").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED the_vm_demo_migrates_a_running_guest_and_says_so: HANDOFF_SKIP_KERNEL_LAB=1"
        );
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["demo", "migration", "--vm", "--hops", "1"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("migrated node-a → node-b"), "{text}");
    assert!(text.contains("ControllerUnpublish on node-a"), "{text}");
    assert!(
        text.contains("rounds verified across 1 live migration(s); no block lost or stale"),
        "{text}"
    );
}
