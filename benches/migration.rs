//! The driver's own time inside a live migration: from ControllerPublishVolume(target)
//! to NodePublishVolume(target) done, i.e. how long the target virt-launcher waits for
//! its disk. Controller and two node plugins run as separate processes (release build)
//! on one shared data dir; each round migrates the volume to the other node.
//!
//! Run as root: `cargo bench --bench migration [-- --migrations N]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use handoff_csi::datacheck;
use support::*;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("migration bench: needs root (loop devices, bind mounts); run it as root");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    let migrations: usize = args
        .iter()
        .position(|a| a == "--migrations")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(50);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(migrations));
}

async fn run(migrations: usize) {
    let cluster = LocalCluster::start(&["node-a", "node-b"], vec![]).await;
    let cap = block_cap(Mode::MultiNodeMultiWriter);
    let mut ctl = cluster.controller.controller().await;
    let id = ctl
        .create_volume(create_request("vm-disk", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let paths = |node: &str| {
        let d = cluster.node(node);
        (d.path("staging"), d.path("disk"))
    };
    let publish = |node: &str| publish_request(&id, node, cap.clone());
    let stage = |ctx: &std::collections::HashMap<String, String>, node: &str| {
        let (staging, target) = paths(node);
        (
            csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
        )
    };
    let mut node_clients = std::collections::HashMap::new();
    for n in ["node-a", "node-b"] {
        node_clients.insert(n, cluster.node(n).node().await);
    }

    // Initial attach on node-a with some data.
    let ctx = ctl
        .controller_publish_volume(publish("node-a"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let (s, p) = stage(&ctx, "node-a");
    let na = node_clients.get_mut("node-a").unwrap();
    na.node_stage_volume(s).await.unwrap();
    na.node_publish_volume(p).await.unwrap();
    let dev = datacheck::open_direct(&paths("node-a").1, true).unwrap();
    datacheck::write_blocks(&dev, 0, 256, 1).unwrap();
    drop(dev);

    let mut times: Vec<Duration> = Vec::with_capacity(migrations);
    let (mut source, mut target) = ("node-a", "node-b");
    for round in 0..migrations {
        let started = Instant::now();
        let ctx = ctl
            .controller_publish_volume(publish(target))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        let (s, p) = stage(&ctx, target);
        let nt = node_clients.get_mut(target).unwrap();
        nt.node_stage_volume(s).await.unwrap();
        nt.node_publish_volume(p).await.unwrap();
        times.push(started.elapsed());

        // Switch-over check, then the source leaves.
        let dev = datacheck::open_direct(&paths(target).1, false).unwrap();
        datacheck::verify_blocks(&dev, &[1; 256]).expect("data intact after hand-off");
        drop(dev);
        let (staging, disk) = paths(source);
        let ns = node_clients.get_mut(source).unwrap();
        ns.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: disk.display().to_string(),
        })
        .await
        .unwrap();
        ns.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: source.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        std::mem::swap(&mut source, &mut target);
        if (round + 1) % 10 == 0 {
            eprintln!("  {}/{migrations} migrations", round + 1);
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "migration: ControllerPublish(target) → NodePublish(target) ready over {migrations} migrations: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; data check passed every round",
        pct(0.5),
        pct(0.99),
        times.last().unwrap().as_secs_f64() * 1e3
    );
}
