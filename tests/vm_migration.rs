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
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff_csi::csi;
use parking_lot::Mutex;
use serde_json::{json, Value};
use support::kernel_lab::Lab;
use support::*;

const BLOCKS: u32 = 64;

/// The guest's workload: round r first checks that every block still holds round r-1
/// (written before — across a migration, by the other host), then writes block i as
/// "HANDOFF gen=r block=i" (O_DIRECT), syncs, and reads every block back (O_DIRECT)
/// against r. Only the guest's memory knows r.
fn workload() -> String {
    format!(
        r#"N={BLOCKS}
r=0
check() {{
  i=0
  bad=0
  while [ $i -lt $N ]; do
    got=$(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | head -n 1)
    want=$(printf 'HANDOFF gen=%08d block=%04d' $1 $i)
    [ "$got" = "$want" ] || {{ bad=$((bad+1)); echo "STALE round=$1 block=$i got=[$got]"; }}
    i=$((i+1))
  done
}}
while :; do
  if [ $r -gt 0 ]; then
    check $r
    [ $bad -eq 0 ] || echo "ROUND $r FAILED on re-read bad=$bad"
  fi
  r=$((r+1))
  i=0
  while [ $i -lt $N ]; do
    printf 'HANDOFF gen=%08d block=%04d\n' $r $i > /tmp/blk
    dd if=/tmp/blk of=/dev/vda bs=4096 seek=$i count=1 conv=sync,notrunc oflag=direct 2>/dev/null || echo "WRITE-ERROR round=$r block=$i"
    i=$((i+1))
  done
  sync
  check $r
  if [ $bad -eq 0 ]; then echo "ROUND $r VERIFIED"; else echo "ROUND $r FAILED bad=$bad"; fi
done
"#
    )
}

struct Vm {
    name: String,
    child: Child,
    qmp: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    fn start(
        lab: &Lab,
        initrd: &Path,
        disk: &Path,
        dir: &Path,
        name: &str,
        incoming: Option<u16>,
    ) -> Vm {
        let qmp = dir.join(format!("qmp-{name}.sock"));
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256"])
            .args([
                "-nodefaults",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(lab.kernel())
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=none,aio=threads,file.locking=off",
                disk.display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qmp.exists() {
            assert!(
                Instant::now() < deadline,
                "QMP socket of {name} never appeared"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Vm {
            name: name.into(),
            child,
            qmp,
            lines,
        }
    }

    fn qmp(&self, execute: &str, arguments: Value) -> Value {
        let mut s = UnixStream::connect(&self.qmp).expect("QMP");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        let mut send = |v: Value| {
            s.write_all(format!("{v}\n").as_bytes()).unwrap();
        };
        send(json!({"execute": "qmp_capabilities"}));
        let answer = |r: &mut BufReader<UnixStream>| loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                return Value::Null;
            }
            let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
            if v.get("event").is_none() {
                return v;
            }
        };
        answer(&mut r);
        let mut cmd = json!({"execute": execute});
        if !arguments.is_null() {
            cmd["arguments"] = arguments;
        }
        send(cmd);
        answer(&mut r)
    }

    /// Rounds verified so far, and any failure lines.
    fn rounds(&self) -> (Vec<u64>, Vec<String>) {
        let lines = self.lines.lock();
        let verified = lines
            .iter()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("ROUND ")?
                    .strip_suffix(" VERIFIED")?
                    .parse()
                    .ok()
            })
            .collect();
        let failed = lines
            .iter()
            .filter(|l| l.contains("FAILED") || l.contains("STALE") || l.contains("WRITE-ERROR"))
            .cloned()
            .collect();
        (verified, failed)
    }

    fn wait_rounds_past(&self, round: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let (verified, failed) = self.rounds();
            assert!(failed.is_empty(), "{}: {failed:?}", self.name);
            if let Some(last) = verified.last().copied().filter(|r| *r > round) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no round past {round} verified within {timeout:?}: {:?}",
                self.name,
                self.lines.lock().iter().rev().take(10).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn last_round(&self) -> u64 {
        self.rounds().0.last().copied().unwrap_or(0)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Attached {
    staging: PathBuf,
    target: PathBuf,
}

fn rwx() -> csi::VolumeCapability {
    block_cap(csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter)
}

async fn attach(cl: &LocalCluster, volume: &str, node: &str) -> Attached {
    let ctx = cl
        .controller
        .controller()
        .await
        .controller_publish_volume(publish_request(volume, node, rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let d = cl.node(node);
    let (staging, target) = (d.path("staging"), d.path("vm-disk"));
    std::fs::create_dir_all(&staging).unwrap();
    let mut n = d.node().await;
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: volume.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
    Attached { staging, target }
}

async fn detach(cl: &LocalCluster, volume: &str, node: &str, a: &Attached) {
    let mut n = cl.node(node).node().await;
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: a.target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: a.staging.display().to_string(),
    })
    .await
    .unwrap();
    cl.controller
        .controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Migrates to the target listening on `port`, again while it is not listening yet.
fn migrate(vm: &Vm, port: u16) -> Value {
    for _ in 0..50 {
        let r = vm.qmp("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
        assert!(r.get("error").is_none(), "migrate: {r}");
        let done = wait_migration(vm, Duration::from_secs(300));
        let refused = done["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("Connection refused"));
        if !refused {
            return done;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the target never listened on {port}");
}

/// Polls query-migrate until it ends; returns the final answer.
fn wait_migration(vm: &Vm, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = vm.qmp("query-migrate", Value::Null);
        let status = r["return"]["status"].as_str().unwrap_or("").to_owned();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return r["return"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "migration still {status} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_live_migrates_a_running_vm_between_two_node_plugins() {
    if !require_root("qemu_live_migrates_a_running_vm_between_two_node_plugins") {
        return;
    }
    if std::env::var("HANDOFF_SKIP_KERNEL_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED qemu_live_migrates_a_running_vm_between_two_node_plugins: HANDOFF_SKIP_KERNEL_LAB=1");
        return;
    }
    let lab =
        Lab::prepare().unwrap_or_else(|e| panic!("the VM migration needs the kernel lab: {e}"));
    let initrd = lab
        .vm_initrd("migration", &workload())
        .expect("VM initramfs");
    let cl = LocalCluster::start(&["node-a", "node-b"], vec![]).await;
    let vol = cl
        .controller
        .controller()
        .await
        .create_volume(create_request("vm-root", 16 * MIB, rwx()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let dir = tempfile::tempdir().unwrap();
    let mut attached: HashMap<&str, Attached> = HashMap::new();
    attached.insert("node-a", attach(&cl, &vol, "node-a").await);
    let mut vm = Vm::start(
        &lab,
        &initrd,
        &attached["node-a"].target,
        dir.path(),
        "on-node-a",
        None,
    );
    let mut round = vm.wait_rounds_past(1, Duration::from_secs(180));
    let mut on = "node-a";
    let mut timings = Vec::new();
    for hop in 0..4 {
        let to = if on == "node-a" { "node-b" } else { "node-a" };
        attached.insert(to, attach(&cl, &vol, to).await);
        let port = free_port();
        let target = Vm::start(
            &lab,
            &initrd,
            &attached[to].target,
            dir.path(),
            &format!("hop{hop}-on-{to}"),
            Some(port),
        );
        let done = migrate(&vm, port);
        assert_eq!(done["status"], "completed", "hop {hop}: {done}");
        timings.push((
            done["total-time"].as_u64().unwrap_or(0),
            done["downtime"].as_u64().unwrap_or(0),
        ));
        let before = vm.last_round();
        vm.qmp("quit", Value::Null);
        let (_, failed) = vm.rounds();
        assert!(failed.is_empty(), "source {}: {failed:?}", vm.name);
        drop(std::mem::replace(&mut vm, target));
        let a = attached.remove(on).unwrap();
        detach(&cl, &vol, on, &a).await;
        // The guest goes on verifying on the target, its expectations intact.
        round = vm.wait_rounds_past(before.max(round) + 1, Duration::from_secs(180));
        on = to;
    }
    // A cancelled migration: the target dies before it completes; the VM stays where it
    // is and keeps verifying.
    let to = if on == "node-a" { "node-b" } else { "node-a" };
    attached.insert(to, attach(&cl, &vol, to).await);
    let port = free_port();
    let mut doomed = Vm::start(
        &lab,
        &initrd,
        &attached[to].target,
        dir.path(),
        "cancelled",
        Some(port),
    );
    vm.qmp(
        "migrate_set_parameters",
        json!({"max-bandwidth": 1_000_000}),
    );
    // Once the target listens (a refused connect is no migration at all).
    loop {
        vm.qmp("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
        std::thread::sleep(Duration::from_millis(300));
        let r = vm.qmp("query-migrate", Value::Null);
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
    let _ = doomed.child.kill();
    let _ = doomed.child.wait();
    let ended = wait_migration(&vm, Duration::from_secs(120));
    assert_ne!(ended["status"], "completed", "{ended}");
    let status = vm.qmp("query-status", Value::Null);
    assert_eq!(status["return"]["status"], "running", "{status}");
    let a = attached.remove(to).unwrap();
    detach(&cl, &vol, to, &a).await;
    let last = vm.wait_rounds_past(round.max(vm.last_round()), Duration::from_secs(180));
    let (_, failed) = vm.rounds();
    assert!(failed.is_empty(), "{failed:?}");
    eprintln!(
        "VM live migration (TCG, lab timings only): 4 hops, (total ms, downtime ms) = {timings:?}; guest verified up to round {last}; cancelled hop left it running on {on}"
    );
    drop(vm);
    let a = attached.remove(on).unwrap();
    detach(&cl, &vol, on, &a).await;
}
