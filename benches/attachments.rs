//! AttachmentManager benchmarks (in process, no gRPC):
//! - publish/unpublish throughput over 10k volumes, with the in-memory store (rules and
//!   locking only) and the durable file store (fsync + rename per change);
//! - rebuild time for 10k PVs with attachment annotations + 10k VolumeAttachments from
//!   the fake Kubernetes API server (watch sync + load + cross-check);
//! - ControllerPublish latency on the PV store, whose decisions read the PV fresh from
//!   the API server (one GET, then the guarded PATCH), at 1 ms and 10 ms injected latency.
//!
//! `cargo bench --bench attachments [-- --volumes N --in-flight N]`

#[path = "support/args.rs"]
mod args;
#[path = "../tests/support/fake_kube.rs"]
mod fake_kube;

use args::arg;
use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff_csi::attachment::cluster::Standalone;
use handoff_csi::attachment::events::LogSink;
use handoff_csi::attachment::state::{AttachmentState, NodeAttachment, PublishRequest};
use handoff_csi::attachment::store::{AttachmentStore, FileStore, MemoryStore};
use handoff_csi::attachment::{AttachmentManager, Policy};
use handoff_csi::backend::StoredCapability;
use handoff_csi::capability::AccessMode;
use handoff_csi::capability::Sharing;
use handoff_csi::ids::{NodeId, VolumeId};
use handoff_csi::kube::cache::ClusterCache;
use handoff_csi::kube::cluster::KubeCluster;
use handoff_csi::kube::kubevirt::KubevirtCache;
use handoff_csi::kube::pv_store::{PvStore, RetryPolicy};
use handoff_csi::kube::{ANNOTATION_NODES, ANNOTATION_STATE};

const DRIVER: &str = "handoff.csi.dev";

async fn throughput(
    label: &str,
    store: Arc<dyn AttachmentStore>,
    volumes: usize,
    in_flight: usize,
) {
    let m = Arc::new(
        AttachmentManager::load(
            store,
            Arc::new(Standalone),
            Arc::new(LogSink),
            Policy {
                grace_period: Duration::ZERO,
                ..Policy::default()
            },
        )
        .await
        .unwrap(),
    );
    let ids: Arc<Vec<VolumeId>> = Arc::new((0..volumes).map(|_| VolumeId::generate()).collect());
    let node_a = NodeId::parse("node-a").unwrap();
    let node_b = NodeId::parse("node-b").unwrap();
    let started = Instant::now();
    let chunks: Vec<_> = (0..in_flight)
        .map(|w| {
            let (m, ids, a, b) = (m.clone(), ids.clone(), node_a.clone(), node_b.clone());
            tokio::spawn(async move {
                let mut ops = 0u64;
                for id in ids.iter().skip(w).step_by(in_flight) {
                    // A full RWX migration: attach A, attach B, detach A, detach B.
                    let req = |n: &NodeId| PublishRequest {
                        node_id: n.clone(),
                        readonly: false,
                        access: StoredCapability {
                            mode: AccessMode::MultiNodeMultiWriter,
                            block: true,
                        },
                    };
                    m.publish(id, Duration::from_secs(300), req(&a))
                        .await
                        .unwrap();
                    m.publish(id, Duration::from_secs(300), req(&b))
                        .await
                        .unwrap();
                    m.unpublish(id, &a).await.unwrap();
                    m.unpublish(id, &b).await.unwrap();
                    ops += 4;
                }
                ops
            })
        })
        .collect();
    let mut ops = 0;
    for c in chunks {
        ops += c.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{label}: {ops} publish/unpublish ops over {volumes} volumes, {in_flight} in flight: {:.2} s → {:.0} ops/s ({:.1} µs/op)",
        secs,
        ops as f64 / secs,
        secs * 1e6 / ops as f64
    );
}

async fn rebuild(volumes: usize) {
    let fake = fake_kube::FakeKube::start().await;
    for n in ["node-a", "node-b"] {
        fake.put("nodes", fake_kube::node(n));
    }
    let setup = Instant::now();
    for i in 0..volumes {
        let id = VolumeId::generate();
        let name = format!("pvc-{i:05}");
        let mut state = AttachmentState::new(id.clone(), Sharing::Rwx, Duration::from_secs(300));
        let holders: &[&str] = if i % 10 == 0 {
            &["node-a", "node-b"]
        } else {
            &["node-a"]
        };
        for n in holders {
            state.nodes.push(NodeAttachment {
                node_id: NodeId::parse(n).unwrap(),
                attached_at: chrono::Utc::now(),
                readonly: false,
                access: None,
                fencing: false,
            });
            fake.put(
                "volumeattachments",
                fake_kube::volume_attachment(DRIVER, &name, n, true),
            );
        }
        if holders.len() == 2 {
            state.migration_started_at = Some(chrono::Utc::now());
        }
        let mut pv = fake_kube::pv(&name, DRIVER, id.as_str());
        pv["metadata"]["annotations"] = serde_json::json!({
            ANNOTATION_STATE: serde_json::to_string(&state).unwrap(),
            ANNOTATION_NODES: holders.join(","),
        });
        fake.put("persistentvolumes", pv);
    }
    eprintln!(
        "  fake API server filled with {volumes} PVs in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let (m, synced) = kube_manager(&fake, Policy::default()).await;
    let total = started.elapsed();
    let states = m.snapshot().await.unwrap();
    assert_eq!(states.len(), volumes);
    assert_eq!(
        states.iter().filter(|s| s.nodes.len() == 2).count(),
        volumes / 10
    );
    println!(
        "rebuild: {volumes} PVs + {} VolumeAttachments from the fake API server: watches synced in {:.2} s, state rebuilt and cross-checked in {:.2} s total",
        volumes + volumes / 10,
        synced.as_secs_f64(),
        total.as_secs_f64()
    );
}

/// A manager on the PV store of `fake`, as the controller builds it; also how long the
/// watches took to sync.
async fn kube_manager(fake: &fake_kube::FakeKube, policy: Policy) -> (AttachmentManager, Duration) {
    let kubeconfig =
        std::env::temp_dir().join(format!("handoff-bench-kubeconfig-{}", std::process::id()));
    fake.write_kubeconfig(&kubeconfig);
    std::env::set_var("KUBECONFIG", &kubeconfig);
    let started = Instant::now();
    let client = kube::Client::try_default().await.unwrap();
    let _ = std::fs::remove_file(kubeconfig);
    let cache = ClusterCache::new(DRIVER);
    cache.spawn_watches(client.clone());
    assert!(
        cache.wait_ready(Duration::from_secs(120)).await,
        "watches synced"
    );
    let synced = started.elapsed();
    let store = Arc::new(PvStore::new(
        kube::Api::all(client.clone()),
        cache.clone(),
        RetryPolicy::default(),
    ));
    let m = AttachmentManager::load(
        store,
        Arc::new(KubeCluster::new(cache, KubevirtCache::new(150), client)),
        Arc::new(LogSink),
        policy,
    )
    .await
    .unwrap();
    (m, synced)
}

async fn publish_latency(api_latency: Duration, rounds: usize) {
    let fake = fake_kube::FakeKube::start().await;
    for n in ["node-a", "node-b"] {
        fake.put("nodes", fake_kube::node(n));
    }
    let id = VolumeId::generate();
    fake.put(
        "persistentvolumes",
        fake_kube::pv("pv-lat", DRIVER, id.as_str()),
    );
    fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-lat", "node-a", true),
    );
    let policy = Policy {
        grace_period: Duration::ZERO,
        ..Policy::default()
    };
    let (m, _) = kube_manager(&fake, policy).await;
    fake.set_faults(fake_kube::Faults {
        latency: api_latency,
        ..Default::default()
    });
    let node = NodeId::parse("node-a").unwrap();
    let req = || PublishRequest {
        node_id: node.clone(),
        readonly: false,
        access: StoredCapability {
            mode: AccessMode::SingleNodeWriter,
            block: true,
        },
    };
    let (mut attach, mut repeat) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        m.publish(&id, Duration::from_secs(300), req())
            .await
            .unwrap();
        attach.push(t.elapsed());
        // The attacher's retry: answered from a fresh read, no write.
        let t = Instant::now();
        m.publish(&id, Duration::from_secs(300), req())
            .await
            .unwrap();
        repeat.push(t.elapsed());
        m.unpublish(&id, &node).await.unwrap();
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
    };
    println!(
        "ControllerPublish on the PV store, API latency {:?}: attach p50 {:.2} ms p99 {:.2} ms; repeated publish (fresh read, no write) p50 {:.2} ms p99 {:.2} ms ({rounds} rounds)",
        api_latency,
        pct(&mut attach, 0.5),
        pct(&mut attach, 0.99),
        pct(&mut repeat, 0.5),
        pct(&mut repeat, 0.99),
    );
}

fn main() {
    let volumes = arg("--volumes", 10_000);
    let in_flight = arg("--in-flight", 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        throughput(
            "memory store",
            Arc::new(MemoryStore::default()),
            volumes,
            in_flight,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        throughput(
            "file store",
            Arc::new(FileStore::open(dir.path()).unwrap()),
            volumes,
            in_flight,
        )
        .await;
        rebuild(volumes).await;
        for ms in [1, 10] {
            publish_latency(Duration::from_millis(ms), arg("--rounds", 200)).await;
        }
    });
}
