//! Crash safety: the controller and both node plugins are SIGKILLed at random moments
//! while a CO stand-in drives attach, detach and live-migration sequences and retries
//! every call until it gets an answer, as Kubernetes does. After every step the stored
//! state must equal the model (order included) and never show an RWO volume on two
//! nodes; at the end nothing may be left attached, mounted or persisted.
//! Seeded and bounded: HANDOFF_CRASH_STEPS (default 60) and HANDOFF_CRASH_SEED.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use support::*;
use tonic::Code;

const NODES: [&str; 2] = ["node-a", "node-b"];

/// Retries `call` through crashes: a transport failure restarts whatever died and tries
/// again; any status is returned.
macro_rules! retry {
    ($cluster:expr, $client:ident = $make:expr, $call:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = {
                #[allow(unused_mut)]
                let mut $client = $make;
                $call.await
            };
            match result {
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) =>
                {
                    assert!(Instant::now() < deadline, "no answer for 60 s: {s:?}");
                    restart_dead($cluster).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Another attempt of ours may still be in flight in a process we restarted.
                Err(s) if s.code() == Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => break other,
            }
        }
    }};
}

async fn restart_dead(c: &mut LocalCluster) {
    c.controller.ensure_running().await;
    for n in &mut c.nodes {
        n.ensure_running().await;
    }
}

/// A channel to the controller (`None`) or a node, restarting and retrying while the
/// harness keeps killing processes.
async fn channel(c: &mut LocalCluster, node: Option<&str>) -> tonic::transport::Channel {
    loop {
        restart_dead(c).await;
        let socket = match node {
            None => c.controller.socket.clone(),
            Some(n) => c.node(n).socket.clone(),
        };
        if let Ok(ch) = handoff_csi::client::connect(&socket).await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn node_client(
    c: &mut LocalCluster,
    node: &str,
) -> csi::node_client::NodeClient<tonic::transport::Channel> {
    csi::node_client::NodeClient::new(channel(c, Some(node)).await)
}

async fn ctl(
    c: &mut LocalCluster,
) -> csi::controller_client::ControllerClient<tonic::transport::Channel> {
    csi::controller_client::ControllerClient::new(channel(c, None).await)
}

struct Vol {
    id: String,
    rwx: bool,
    /// The model: nodes holding the volume, in order.
    nodes: Vec<&'static str>,
}

fn cap(v: &Vol) -> csi::VolumeCapability {
    block_cap(if v.rwx {
        Mode::MultiNodeMultiWriter
    } else {
        Mode::SingleNodeWriter
    })
}

async fn attach(c: &mut LocalCluster, v: &Vol, node: &'static str) -> Result<(), tonic::Status> {
    let req = publish_request(&v.id, node, cap(v));
    let ctx = retry!(
        c,
        ctl = ctl(c).await,
        ctl.controller_publish_volume(req.clone())
    )?
    .into_inner()
    .publish_context;
    let d = c.node(node);
    let (staging, target) = (
        d.path(&format!("st-{}", v.id)),
        d.path(&format!("pub-{}", v.id)),
    );
    let stage = csi::NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap(v)),
        ..Default::default()
    };
    retry!(
        c,
        nc = node_client(c, node).await,
        nc.node_stage_volume(stage.clone())
    )
    .unwrap();
    let publish = csi::NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        publish_context: ctx,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap(v)),
        ..Default::default()
    };
    retry!(
        c,
        nc = node_client(c, node).await,
        nc.node_publish_volume(publish.clone())
    )
    .unwrap();
    Ok(())
}

async fn detach(c: &mut LocalCluster, v: &Vol, node: &'static str) {
    let d = c.node(node);
    let (staging, target) = (
        d.path(&format!("st-{}", v.id)),
        d.path(&format!("pub-{}", v.id)),
    );
    let unpublish = csi::NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: target.display().to_string(),
    };
    retry!(
        c,
        nc = node_client(c, node).await,
        nc.node_unpublish_volume(unpublish.clone())
    )
    .unwrap();
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    retry!(
        c,
        nc = node_client(c, node).await,
        nc.node_unstage_volume(unstage.clone())
    )
    .unwrap();
    let req = csi::ControllerUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        node_id: node.into(),
        ..Default::default()
    };
    retry!(
        c,
        ctl = ctl(c).await,
        ctl.controller_unpublish_volume(req.clone())
    )
    .unwrap();
}

fn check_model(c: &LocalCluster, vols: &[Vol], step: usize, seed: u64) {
    for v in vols {
        let stored: Vec<String> = c
            .stored_state(&v.id)
            .map(|s| stored_nodes(&s))
            .unwrap_or_default();
        assert_eq!(
            stored, v.nodes,
            "seed {seed} step {step}: volume {} stored state differs from the model",
            v.id
        );
        assert!(
            v.rwx || stored.len() <= 1,
            "seed {seed} step {step}: RWO volume on two nodes"
        );
    }
}

#[tokio::test]
async fn random_crashes_never_break_the_attach_rules() {
    if !require_root("random_crashes_never_break_the_attach_rules") {
        return;
    }
    let steps: usize = std::env::var("HANDOFF_CRASH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("HANDOFF_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xc0ffee);
    let mut rng = Rng::new(seed);
    // Zero grace: a detached RWO holder is forgotten at once, so the model stays plain.
    let mut c = LocalCluster::start(&NODES, vec!["--attach-grace-period".into(), "0".into()]).await;
    let mut vols = Vec::new();
    for (i, rwx) in [false, false, true].into_iter().enumerate() {
        let cap = block_cap(if rwx {
            Mode::MultiNodeMultiWriter
        } else {
            Mode::SingleNodeWriter
        });
        let id = ctl(&mut c)
            .await
            .create_volume(create_request(&format!("crash-{i}"), 8 * MIB, cap))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        vols.push(Vol {
            id,
            rwx,
            nodes: vec![],
        });
    }

    // The killer: SIGKILLs a random process of the cluster every few tens of ms.
    let pids = |c: &LocalCluster| {
        let mut p = vec![c.controller.pid()];
        p.extend(c.nodes.iter().map(|n| n.pid()));
        p
    };
    let mut kills = 0;
    let mut conflicts: HashMap<&str, usize> = HashMap::new();
    for step in 0..steps {
        if rng.next() % 3 == 0 {
            let all = pids(&c);
            let victim = all[(rng.next() % all.len() as u64) as usize];
            let delay = rng.next() % 30;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(victim as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            });
            kills += 1;
        }
        let vi = (rng.next() % vols.len() as u64) as usize;
        let node = NODES[(rng.next() % 2) as usize];
        let holds = vols[vi].nodes.contains(&node);
        if holds {
            let v = &vols[vi];
            detach(&mut c, v, node).await;
            vols[vi].nodes.retain(|n| *n != node);
        } else {
            let v = &vols[vi];
            let allowed = if v.rwx {
                v.nodes.len() < 2
            } else {
                v.nodes.is_empty()
            };
            match attach(&mut c, v, node).await {
                Ok(()) => {
                    assert!(
                        allowed,
                        "seed {seed} step {step}: attach to {node} should have been refused"
                    );
                    vols[vi].nodes.push(node);
                }
                Err(s) => {
                    assert!(!allowed, "seed {seed} step {step}: refused {node}: {s:?}");
                    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                    *conflicts.entry("refused").or_default() += 1;
                }
            }
        }
        restart_dead(&mut c).await;
        check_model(&c, &vols, step, seed);
    }

    // Wind down: detach everything, then nothing may remain.
    for v in &mut vols {
        for node in v.nodes.clone() {
            detach(&mut c, v, node).await;
        }
        v.nodes.clear();
    }
    restart_dead(&mut c).await;
    check_model(&c, &vols, steps, seed);
    let root = std::fs::canonicalize(c.shared.path()).unwrap();
    assert!(
        loops_under(&root).is_empty(),
        "leaked loop devices: {:?}",
        loops_under(&root)
    );
    for n in &c.nodes {
        let dir = std::fs::canonicalize(n.dir.path()).unwrap();
        assert!(
            mounts_under(&dir).is_empty(),
            "leaked mounts: {:?}",
            mounts_under(&dir)
        );
    }
    eprintln!("crash harness: {steps} steps, {kills} SIGKILLs, seed {seed}, {conflicts:?}");
}
