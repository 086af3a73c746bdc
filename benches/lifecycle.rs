//! Full CSI lifecycle benchmark over the real socket, against the release binary:
//! Create → ControllerPublish → NodeStage → NodePublish → NodeUnpublish → NodeUnstage →
//! ControllerUnpublish → Delete, with a fixed number of lifecycles in flight.
//!
//! Run as root: `cargo bench --bench lifecycle` (options: `-- --block N --mount N
//! --in-flight N`). Prints lifecycles/s, per-step p50/p99 and the driver's peak RSS.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff_csi::csi;
use support::*;
use tokio::sync::Mutex;

const STEPS: [&str; 8] = [
    "CreateVolume",
    "ControllerPublish",
    "NodeStage",
    "NodePublish",
    "NodeUnpublish",
    "NodeUnstage",
    "ControllerUnpublish",
    "DeleteVolume",
];

struct Args {
    block: usize,
    mount: usize,
    in_flight: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        block: 1000,
        mount: 48,
        in_flight: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse().ok())
                .expect("numeric value")
        };
        match a.as_str() {
            "--block" => args.block = value(),
            "--mount" => args.mount = value(),
            "--in-flight" => args.in_flight = value(),
            _ => {} // cargo bench passes --bench
        }
    }
    args
}

async fn lifecycle(
    cluster: &LocalCluster,
    i: usize,
    cap: &csi::VolumeCapability,
    block: bool,
) -> [Duration; 8] {
    let d = cluster.node("node-a");
    let (mut c, mut n) = (cluster.controller.controller().await, d.node().await);
    let mut times = [Duration::ZERO; 8];
    let mut step = 0;
    let mut timed = |t: Instant| {
        times[step] = t.elapsed();
        step += 1;
    };
    let staging = d.path(&format!("staging-{i}"));
    let target = d.path(&format!("target-{i}"));
    let t = Instant::now();
    let id = c
        .create_volume(create_request(&format!("bench-{i}"), 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    timed(t);
    let t = Instant::now();
    let ctx = c
        .controller_publish_volume(publish_request(&id, "node-a", cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    timed(t);
    let t = Instant::now();
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    timed(t);
    let t = Instant::now();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: id.clone(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    timed(t);
    if !block {
        std::fs::write(target.join("probe"), b"x").unwrap();
    }
    let t = Instant::now();
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    timed(t);
    let t = Instant::now();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
    timed(t);
    let t = Instant::now();
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    timed(t);
    let t = Instant::now();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .unwrap();
    timed(t);
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// A `/proc/<pid>/status` field in KiB (VmRSS: now, VmHWM: peak).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn run(
    label: &'static str,
    count: usize,
    in_flight: usize,
    cap: csi::VolumeCapability,
    block: bool,
) {
    if count == 0 {
        return;
    }
    let d = Arc::new(LocalCluster::start(&["node-a"], vec![]).await);
    let node_pid = d.node("node-a").pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let node_idle = status_kib(node_pid, "VmRSS:");
    let next = Arc::new(Mutex::new(0usize));
    let samples = Arc::new(Mutex::new(vec![Vec::<Duration>::new(); 8]));
    let started = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (d, next, samples, cap) = (d.clone(), next.clone(), samples.clone(), cap.clone());
            tokio::spawn(async move {
                loop {
                    let i = {
                        let mut n = next.lock().await;
                        if *n >= count {
                            return;
                        }
                        *n += 1;
                        *n
                    };
                    let times = lifecycle(&d, i, &cap, block).await;
                    let mut s = samples.lock().await;
                    for (k, t) in times.iter().enumerate() {
                        s[k].push(*t);
                    }
                    if i % (count / 10).max(1) == 0 {
                        eprintln!("  {label}: {i}/{count} lifecycles");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    let ctl_pid = d.controller.pid();
    println!(
        "\n{label}: {count} lifecycles, {in_flight} in flight, {:.2} s → {:.1} lifecycles/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
    );
    println!(
        "RSS: node plugin idle {:.1} MiB, after {count} lifecycles {:.1} MiB (peak {:.1}); controller now {:.1} MiB (peak {:.1})",
        mib(node_idle),
        mib(status_kib(node_pid, "VmRSS:")),
        mib(status_kib(node_pid, "VmHWM:")),
        mib(status_kib(ctl_pid, "VmRSS:")),
        mib(status_kib(ctl_pid, "VmHWM:")),
    );
    println!("| step | p50 ms | p99 ms |\n|---|---|---|");
    let mut samples = samples.lock().await;
    for (k, name) in STEPS.iter().enumerate() {
        samples[k].sort();
        println!(
            "| {name} | {:.2} | {:.2} |",
            percentile(&samples[k], 0.5).as_secs_f64() * 1e3,
            percentile(&samples[k], 0.99).as_secs_f64() * 1e3
        );
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("lifecycle bench: needs root (loop devices, mkfs, mount); run it as root");
        std::process::exit(1);
    }
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        run("block", args.block, args.in_flight, rwo_block(), true).await;
        run("ext4", args.mount, args.in_flight, rwo_mount("ext4"), false).await;
    });
}
