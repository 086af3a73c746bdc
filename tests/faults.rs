//! One writer when peers misbehave: the AttachmentManager against a store that fails and
//! lies (a write that lands but reports an error), a fence that fails, nodes that vanish,
//! a VolumeAttachment list that lies, and controller replicas that restart or take over.
//! After every step the invariant is checked from the storage side: the nodes the
//! target admits never hold an RWO volume twice or an RWX volume three times, an OK
//! unpublish left its node cut off, and an OK publish is in the store.
//!
//! `HANDOFF_SCHEDULES` (default 2000), `HANDOFF_SCHEDULE_BASE` (first seed),
//! `HANDOFF_SCHEDULE_STEPS` (default 40) run more, and `HANDOFF_SCHEDULE_SEED` replays one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use handoff_csi::attachment::cluster::{AttachmentObject, ClusterError, ClusterView};
use handoff_csi::attachment::events::RecordingSink;
use handoff_csi::attachment::fence::{FenceError, FenceReport, NodeFence};
use handoff_csi::attachment::state::{AttachmentState, PublishRequest};
use handoff_csi::attachment::store::{AttachmentStore, StoreError};
use handoff_csi::attachment::{AttachError, AttachmentManager, Policy};
use handoff_csi::backend::{Fencing, StoredCapability};
use handoff_csi::capability::AccessMode;
use handoff_csi::ids::{NodeId, VolumeId};
use parking_lot::Mutex;

/// splitmix64: seeded, so a failing schedule can be replayed exactly.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `pct`/100.
    fn chance(&mut self, pct: u32) -> bool {
        self.below(100) < pct as u64
    }
}

/// A store with resourceVersion-guarded writes (409 → Stale) that fails on command:
/// before the write, or after it landed (the caller hears an error for a write that
/// happened, as after a timeout).
struct FaultyStore {
    objects: Mutex<BTreeMap<VolumeId, (u64, AttachmentState)>>,
    version: Mutex<u64>,
    fail_pct: AtomicU32,
    rng: Mutex<Rng>,
}

impl FaultyStore {
    fn new(seed: u64) -> Self {
        FaultyStore {
            objects: Mutex::default(),
            version: Mutex::new(1),
            fail_pct: AtomicU32::new(0),
            rng: Mutex::new(Rng(seed ^ 0x5107E)),
        }
    }

    /// None: no fault; Some(true): fail after writing; Some(false): fail before.
    fn fault(&self) -> Option<bool> {
        let pct = self.fail_pct.load(Ordering::SeqCst);
        let mut rng = self.rng.lock();
        rng.chance(pct).then(|| rng.chance(50))
    }

    fn nodes(&self, v: &VolumeId) -> Vec<NodeId> {
        self.objects
            .lock()
            .get(v)
            .map(|(_, s)| s.node_ids().cloned().collect())
            .unwrap_or_default()
    }

    fn guarded(
        &self,
        state: &AttachmentState,
        next: Option<AttachmentState>,
    ) -> Result<(), StoreError> {
        let fault = self.fault();
        if fault == Some(false) {
            return Err(StoreError::Unavailable("injected: no answer".into()));
        }
        let mut objects = self.objects.lock();
        let current = objects.get(&state.volume_id).map(|(v, _)| v.to_string());
        if current != state.stored_version {
            return Err(StoreError::Stale {
                object: format!("volume {}", state.volume_id),
            });
        }
        match next {
            Some(mut s) => {
                let mut version = self.version.lock();
                *version += 1;
                s.stored_version = None;
                objects.insert(s.volume_id.clone(), (*version, s));
            }
            None => {
                objects.remove(&state.volume_id);
            }
        }
        if fault == Some(true) {
            return Err(StoreError::Unavailable(
                "injected: write landed, answer lost".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl AttachmentStore for FaultyStore {
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError> {
        Ok(self
            .objects
            .lock()
            .values()
            .map(|(v, s)| AttachmentState {
                stored_version: Some(v.to_string()),
                ..s.clone()
            })
            .collect())
    }
    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError> {
        Ok(self
            .objects
            .lock()
            .get(volume)
            .map(|(v, s)| AttachmentState {
                stored_version: Some(v.to_string()),
                ..s.clone()
            }))
    }
    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError> {
        self.guarded(state, Some(state.clone()))
    }
    async fn remove(&self, state: &AttachmentState) -> Result<(), StoreError> {
        self.guarded(state, None)
    }
}

/// The storage target: which nodes it admits per volume, and a fence that fails on
/// command (the target unreachable).
struct FakeTarget {
    admitted: Mutex<BTreeMap<VolumeId, BTreeSet<NodeId>>>,
    fail_pct: AtomicU32,
    rng: Mutex<Rng>,
}

impl FakeTarget {
    fn allow(&self, v: &VolumeId, n: &NodeId) {
        self.admitted
            .lock()
            .entry(v.clone())
            .or_default()
            .insert(n.clone());
    }
    fn admitted(&self, v: &VolumeId) -> BTreeSet<NodeId> {
        self.admitted.lock().get(v).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl NodeFence for FakeTarget {
    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<FenceReport, FenceError> {
        let pct = self.fail_pct.load(Ordering::SeqCst);
        if self.rng.lock().chance(pct) {
            return Err(FenceError {
                volume: volume.clone(),
                node: node.clone(),
                reason: "injected: storage host unreachable".into(),
            });
        }
        let dropped = self
            .admitted
            .lock()
            .get_mut(volume)
            .is_some_and(|s| s.remove(node));
        Ok(FenceReport {
            method: Fencing::Target,
            connections: Some(usize::from(dropped)),
        })
    }
}

/// Nodes that vanish, and a VolumeAttachment list that may lie (omit live objects).
#[derive(Default)]
struct FakeCluster {
    gone: Mutex<Vec<NodeId>>,
    objects: Mutex<Vec<AttachmentObject>>,
    lie: Mutex<bool>,
}

#[async_trait]
impl ClusterView for FakeCluster {
    async fn gone_nodes(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        let gone = self.gone.lock();
        Ok(nodes.iter().filter(|n| gone.contains(n)).cloned().collect())
    }
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        if *self.lie.lock() {
            return Ok(Some(Vec::new()));
        }
        Ok(Some(self.objects.lock().clone()))
    }
}

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

fn node(i: u64) -> NodeId {
    NodeId::parse(NODES[i as usize % NODES.len()]).unwrap()
}

struct Volume {
    id: VolumeId,
    mode: AccessMode,
    limit: usize,
}

struct World {
    store: Arc<FaultyStore>,
    target: Arc<FakeTarget>,
    cluster: Arc<FakeCluster>,
    replicas: Vec<AttachmentManager>,
    volumes: Vec<Volume>,
    /// What the CO was told: an OK publish not yet undone by an OK unpublish.
    published: BTreeSet<(usize, NodeId)>,
}

async fn replica(
    w_store: &Arc<FaultyStore>,
    cluster: &Arc<FakeCluster>,
    target: &Arc<FakeTarget>,
) -> AttachmentManager {
    AttachmentManager::load(
        w_store.clone(),
        cluster.clone(),
        Arc::new(RecordingSink::default()),
        Policy {
            grace_period: Duration::from_secs(30),
            allow_rwx_block_sharing: false,
        },
    )
    .await
    .expect("load never fails on one object")
    .with_fence(target.clone())
}

impl World {
    async fn new(seed: u64) -> World {
        let store = Arc::new(FaultyStore::new(seed));
        let target = Arc::new(FakeTarget {
            admitted: Mutex::default(),
            fail_pct: AtomicU32::new(0),
            rng: Mutex::new(Rng(seed ^ 0xFE7CE)),
        });
        let cluster = Arc::new(FakeCluster::default());
        let mut replicas = Vec::new();
        for _ in 0..2 {
            replicas.push(replica(&store, &cluster, &target).await);
        }
        World {
            store,
            target,
            cluster,
            replicas,
            volumes: vec![
                Volume {
                    id: VolumeId::generate(),
                    mode: AccessMode::SingleNodeWriter,
                    limit: 1,
                },
                Volume {
                    id: VolumeId::generate(),
                    mode: AccessMode::MultiNodeMultiWriter,
                    limit: 2,
                },
            ],
            published: BTreeSet::new(),
        }
    }

    /// The VolumeAttachments the CO keeps: one per node it published to.
    fn sync_objects(&self) {
        *self.cluster.objects.lock() = self
            .published
            .iter()
            .map(|(v, n)| AttachmentObject {
                volume: self.volumes[*v].id.clone(),
                node: n.clone(),
                attached: true,
                created: None,
            })
            .collect();
    }

    async fn step(&mut self, rng: &mut Rng, log: &mut Vec<String>) -> Result<(), String> {
        let r = rng.below(self.replicas.len() as u64) as usize;
        let vi = rng.below(self.volumes.len() as u64) as usize;
        let n = node(rng.below(3));
        let (id, mode) = (self.volumes[vi].id.clone(), self.volumes[vi].mode);
        match rng.below(100) {
            0..=39 => {
                let req = PublishRequest {
                    node_id: n.clone(),
                    readonly: false,
                    access: StoredCapability { mode, block: true },
                };
                let result = self.replicas[r]
                    .publish(&id, Duration::from_secs(300), req)
                    .await;
                log.push(format!(
                    "r{r} publish v{vi} {n}: {:?}",
                    result.as_ref().map_err(short)
                ));
                if result.is_ok() {
                    // The handler admits the node at the target once the decision is
                    // stored, then confirms it still holds the volume.
                    self.target.allow(&id, &n);
                    let confirmed = self.replicas[r].confirm_holder(&id, &n).await;
                    log.push(format!(
                        "r{r} confirm v{vi} {n}: {:?}",
                        confirmed.as_ref().map_err(short)
                    ));
                    if confirmed.is_err() {
                        return self.check();
                    }
                    self.published.insert((vi, n.clone()));
                    if !self.store.nodes(&id).contains(&n) {
                        return Err(format!("OK publish of {n} is not in the store"));
                    }
                }
            }
            40..=74 => {
                let result = self.replicas[r].unpublish(&id, &n).await;
                log.push(format!(
                    "r{r} unpublish v{vi} {n}: {:?}",
                    result.as_ref().map_err(short)
                ));
                if result.is_ok() {
                    self.published.remove(&(vi, n.clone()));
                    if self.target.admitted(&id).contains(&n) {
                        return Err(format!("OK unpublish left {n} admitted at the target"));
                    }
                    if self.store.nodes(&id).contains(&n) {
                        return Err(format!("OK unpublish left {n} in the store"));
                    }
                }
            }
            75..=84 => {
                let result = self.replicas[r].reconcile(Duration::ZERO).await;
                log.push(format!(
                    "r{r} reconcile: {:?}",
                    result.map(|x| x.cleared.len()).map_err(|e| short(&e))
                ));
            }
            85..=89 => {
                log.push(format!("r{r} restarts"));
                self.replicas[r] = replica(&self.store, &self.cluster, &self.target).await;
            }
            90..=93 => {
                let pct = [0, 30, 100][rng.below(3) as usize];
                log.push(format!("fence failure rate {pct}%"));
                self.target.fail_pct.store(pct, Ordering::SeqCst);
            }
            94..=96 => {
                let pct = [0, 20, 60][rng.below(3) as usize];
                log.push(format!("store failure rate {pct}%"));
                self.store.fail_pct.store(pct, Ordering::SeqCst);
            }
            97 => {
                let lie = !*self.cluster.lie.lock();
                log.push(format!("VolumeAttachment list lies: {lie}"));
                *self.cluster.lie.lock() = lie;
            }
            _ => {
                log.push(format!("{n} is deleted from the cluster"));
                self.cluster.gone.lock().push(n);
            }
        }
        self.sync_objects();
        self.check()
    }

    /// The guarantee, from the storage side.
    fn check(&self) -> Result<(), String> {
        for (i, v) in self.volumes.iter().enumerate() {
            let admitted = self.target.admitted(&v.id);
            if admitted.len() > v.limit {
                return Err(format!(
                    "v{i} ({:?}) admitted at the target on {admitted:?}, limit {}",
                    v.mode, v.limit
                ));
            }
        }
        Ok(())
    }
}

fn short(e: &AttachError) -> String {
    let text = e.to_string();
    text.chars().take(60).collect()
}

async fn run_schedule(seed: u64, steps: usize) -> Result<(), String> {
    let mut world = World::new(seed).await;
    let mut rng = Rng(seed);
    let mut log = Vec::new();
    for _ in 0..steps {
        if let Err(violation) = world.step(&mut rng, &mut log).await {
            return Err(format!(
                "seed {seed}: {violation}\nschedule:\n  {}",
                log.join("\n  ")
            ));
        }
    }
    Ok(())
}

// Paused time: the rebuild's back-off under injected store failures costs no wall time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn randomized_schedules_never_admit_a_second_writer() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|s| s.parse().unwrap_or_else(|_| panic!("{name} is a number")))
            .unwrap_or(default)
    };
    let (schedules, base, steps) = (
        env("HANDOFF_SCHEDULES", 2000),
        env("HANDOFF_SCHEDULE_BASE", 0xC0FFEE),
        env("HANDOFF_SCHEDULE_STEPS", 40) as usize,
    );
    let seeds: Vec<u64> = match std::env::var("HANDOFF_SCHEDULE_SEED") {
        Ok(_) => vec![env("HANDOFF_SCHEDULE_SEED", 0)],
        Err(_) => (0..schedules).map(|i| base + i).collect(),
    };
    let started = std::time::Instant::now();
    for &seed in &seeds {
        if let Err(report) = run_schedule(seed, steps).await {
            panic!(
                "{report}\n(replay: HANDOFF_SCHEDULE_SEED={seed} HANDOFF_SCHEDULE_STEPS={steps})"
            );
        }
    }
    println!(
        "{} schedules of {steps} steps, no violation, {:.1} s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The harness can fail: with the fence taken out of the manager (freeing the slot
/// without cutting the node off, as before the fix), it finds a second writer.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_harness_catches_a_manager_that_frees_before_fencing() {
    struct Blind(Arc<FakeTarget>);
    #[async_trait]
    impl NodeFence for Blind {
        async fn fence(&self, _: &VolumeId, _: &NodeId) -> Result<FenceReport, FenceError> {
            let _ = &self.0;
            Ok(FenceReport::NONE) // says done, cuts nothing
        }
    }
    let mut found = None;
    for seed in 0..200u64 {
        let mut world = World::new(seed).await;
        let blind: Arc<dyn NodeFence> = Arc::new(Blind(world.target.clone()));
        let mut replicas = Vec::new();
        for _ in 0..2 {
            replicas.push(
                AttachmentManager::load(
                    world.store.clone(),
                    world.cluster.clone(),
                    Arc::new(RecordingSink::default()),
                    Policy::default(),
                )
                .await
                .unwrap()
                .with_fence(blind.clone()),
            );
        }
        world.replicas = replicas;
        let mut rng = Rng(seed);
        let mut log = Vec::new();
        for _ in 0..40 {
            if let Err(v) = world.step(&mut rng, &mut log).await {
                found = Some(v);
                break;
            }
            // A restart would bring back the real fence; keep it blind.
            if log.last().is_some_and(|l| l.ends_with("restarts")) {
                break;
            }
        }
        if found.is_some() {
            break;
        }
    }
    assert!(found.is_some(), "an unfenced free must be caught");
}
