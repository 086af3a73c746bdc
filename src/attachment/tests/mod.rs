//! AttachmentManager tests: persistence, races, events, reconciler, and a randomized
//! comparison against a reference model of the rules.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::cluster::{AttachmentObject, Standalone};
use super::events::RecordingSink;
use super::state::{MigrationOutcome, DEFAULT_MIGRATION_TIMEOUT};
use super::store::{FileStore, MemoryStore};
use super::*;

mod reconciler;

fn node(n: &str) -> NodeId {
    NodeId::parse(n).unwrap()
}

fn req(n: &str, sharing: Sharing) -> PublishRequest {
    PublishRequest {
        node_id: node(n),
        readonly: sharing == Sharing::Rox,
        access: super::state::tests::access_for(sharing),
    }
}

async fn manager_with(
    store: Arc<dyn AttachmentStore>,
    cluster: Arc<dyn ClusterView>,
    grace: Duration,
) -> (AttachmentManager, Arc<RecordingSink>) {
    let sink = Arc::new(RecordingSink::default());
    let m = AttachmentManager::load(
        store,
        cluster,
        sink.clone(),
        Policy {
            grace_period: grace,
            allow_rwx_block_sharing: false,
        },
    )
    .await
    .unwrap();
    sink.take();
    (m, sink)
}

async fn manager() -> (AttachmentManager, Arc<RecordingSink>) {
    manager_with(
        Arc::new(MemoryStore::default()),
        Arc::new(Standalone),
        Duration::from_secs(30),
    )
    .await
}

async fn publish(
    m: &AttachmentManager,
    v: &VolumeId,
    sharing: Sharing,
    n: &str,
) -> Result<PublishOutcome, AttachError> {
    m.publish(v, DEFAULT_MIGRATION_TIMEOUT, req(n, sharing))
        .await
}

#[tokio::test]
async fn state_survives_a_restart_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let (m, _) = manager_with(store.clone(), Arc::new(Standalone), Duration::from_secs(30)).await;
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwx, "a").await.unwrap();
    assert_eq!(
        publish(&m, &v, Sharing::Rwx, "b").await.unwrap(),
        PublishOutcome::MigrationStarted
    );
    let before = m.snapshot().await.unwrap();
    drop(m);
    let (m, sink) = manager_with(
        Arc::new(FileStore::open(dir.path()).unwrap()),
        Arc::new(Standalone),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        m.snapshot().await.unwrap(),
        before,
        "order and migration start time survive"
    );
    assert!(sink.take().is_empty());
    m.unpublish(&v, &node("a")).await.unwrap();
    m.unpublish(&v, &node("b")).await.unwrap();
    assert!(m.state(&v).await.unwrap().is_none());
    assert!(store.load_all().await.unwrap().is_empty());
}

#[tokio::test]
async fn racing_rwo_publishes_have_exactly_one_winner() {
    let (m, _) = manager().await;
    let m = Arc::new(m);
    let v = VolumeId::generate();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (m, v, b) = (m.clone(), v.clone(), barrier.clone());
            tokio::spawn(async move {
                b.wait().await;
                publish(&m, &v, Sharing::Rwo, &format!("n{i}")).await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(AttachError::Busy(_)) | Err(AttachError::Refused(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(m.attached_nodes(&v).await.unwrap().len(), 1);
}

#[tokio::test]
async fn racing_rwx_publishes_never_exceed_two_nodes() {
    let (m, _) = manager().await;
    let m = Arc::new(m);
    let v = VolumeId::generate();
    for round in 0..20 {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (m, v) = (m.clone(), v.clone());
                tokio::spawn(async move {
                    let n = format!("r{round}n{i}");
                    let _ = publish(&m, &v, Sharing::Rwx, &n).await;
                    tokio::task::yield_now().await;
                    if i % 3 == 0 {
                        let _ = m.unpublish(&v, &node(&n)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            m.attached_nodes(&v).await.unwrap().len() <= 2,
            "round {round}: {:?}",
            m.attached_nodes(&v).await.unwrap()
        );
    }
}

#[tokio::test]
async fn events_name_source_and_target() {
    let (m, sink) = manager().await;
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwx, "a").await.unwrap();
    publish(&m, &v, Sharing::Rwx, "b").await.unwrap();
    assert!(publish(&m, &v, Sharing::Rwx, "c").await.is_err());
    m.unpublish(&v, &node("a")).await.unwrap();
    publish(&m, &v, Sharing::Rwx, "c").await.unwrap();
    m.unpublish(&v, &node("c")).await.unwrap();
    let events = sink.take();
    let interesting: Vec<_> = events
        .into_iter()
        .filter(|e| {
            !matches!(
                e,
                AttachEvent::Attached { .. } | AttachEvent::Detached { .. }
            )
        })
        .collect();
    assert!(
        matches!(&interesting[0], AttachEvent::MigrationStarted(m) if m.source == node("a") && m.target == node("b"))
    );
    assert!(
        matches!(&interesting[1], AttachEvent::AttachConflict { kind: "migration_limit", requester, .. } if *requester == node("c"))
    );
    assert!(
        matches!(&interesting[2], AttachEvent::MigrationEnded { source, target, outcome: MigrationOutcome::Completed, duration: Some(_), .. } if *source == node("a") && *target == node("b"))
    );
    assert!(
        matches!(&interesting[3], AttachEvent::MigrationStarted(m) if m.source == node("b") && m.target == node("c"))
    );
    assert!(
        matches!(&interesting[4], AttachEvent::MigrationEnded { source, target, outcome: MigrationOutcome::Aborted, remaining, .. } if *source == node("b") && *target == node("c") && *remaining == node("b"))
    );
    assert_eq!(interesting.len(), 5);
}

#[tokio::test]
async fn rwo_handoff_within_grace_is_reported() {
    let (m, sink) = manager().await;
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwo, "a").await.unwrap();
    m.unpublish(&v, &node("a")).await.unwrap();
    assert!(
        m.state(&v).await.unwrap().is_some(),
        "release remembered during the grace period"
    );
    assert!(m.attached_nodes(&v).await.unwrap().is_empty());
    assert_eq!(
        publish(&m, &v, Sharing::Rwo, "b").await.unwrap(),
        PublishOutcome::HandedOff
    );
    assert!(sink
        .take()
        .iter()
        .any(|e| matches!(e, AttachEvent::HandedOff { from, to, .. } if *from == node("a") && *to == node("b"))));
}

/// A store whose writes can be made to fail, to prove "durable before OK", or to race
/// with another writer, to prove that a stale decision is made again.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    failing: AtomicBool,
    /// On the next save: another controller attaches this node first.
    race_with: parking_lot::Mutex<Option<NodeId>>,
}

#[async_trait]
impl AttachmentStore for FlakyStore {
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError> {
        self.inner.load_all().await
    }
    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError> {
        self.inner.load(volume).await
    }
    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                op: "write",
                path: "flaky".into(),
                source: std::io::Error::other("injected"),
            });
        }
        let racer = self.race_with.lock().take();
        if let Some(other) = racer {
            let mut theirs = AttachmentState::new(
                state.volume_id.clone(),
                state.sharing,
                DEFAULT_MIGRATION_TIMEOUT,
            );
            theirs.nodes.push(state::NodeAttachment {
                node_id: other,
                attached_at: Utc::now(),
                readonly: false,
                access: None,
                fencing: false,
            });
            self.inner.save(&theirs).await?;
            return Err(StoreError::Stale {
                object: "flaky".into(),
            });
        }
        self.inner.save(state).await
    }
    async fn remove(&self, state: &AttachmentState) -> Result<(), StoreError> {
        self.inner.remove(state).await
    }
}

#[tokio::test]
async fn a_stale_write_is_decided_again_on_fresh_state() {
    let store = Arc::new(FlakyStore::default());
    let (m, _) = manager_with(store.clone(), Arc::new(Standalone), Duration::from_secs(30)).await;
    let v = VolumeId::generate();
    // Another replica attached node-x between our read and our write: RWO must refuse.
    *store.race_with.lock() = Some(node("x"));
    let err = publish(&m, &v, Sharing::Rwo, "a").await.unwrap_err();
    assert!(
        matches!(&err, AttachError::Refused(PublishRefusal::HeldElsewhere { holder, .. }) if *holder == node("x")),
        "{err}"
    );
    assert_eq!(m.attached_nodes(&v).await.unwrap(), vec![node("x")]);
}

#[tokio::test]
async fn a_failed_write_changes_nothing() {
    let store = Arc::new(FlakyStore::default());
    let (m, sink) =
        manager_with(store.clone(), Arc::new(Standalone), Duration::from_secs(30)).await;
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwx, "a").await.unwrap();
    store.failing.store(true, Ordering::SeqCst);
    sink.take();
    assert!(matches!(
        publish(&m, &v, Sharing::Rwx, "b").await,
        Err(AttachError::Store(_))
    ));
    assert_eq!(m.attached_nodes(&v).await.unwrap(), vec![node("a")]);
    assert!(
        sink.take().is_empty(),
        "no event for a change that did not happen"
    );
    store.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        publish(&m, &v, Sharing::Rwx, "b").await.unwrap(),
        PublishOutcome::MigrationStarted
    );
}

/// A cluster where some nodes are deleted and VolumeAttachments are scripted.
#[derive(Default)]
struct FakeCluster {
    gone: parking_lot::Mutex<Vec<NodeId>>,
    objects: parking_lot::Mutex<Option<Vec<AttachmentObject>>>,
}

#[async_trait]
impl ClusterView for FakeCluster {
    async fn gone_nodes(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        let gone = self.gone.lock();
        Ok(nodes.iter().filter(|n| gone.contains(n)).cloned().collect())
    }
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        Ok(self.objects.lock().clone())
    }
}

/// A fence that records, for each node it cuts, whether the store still listed that node
/// (marked as leaving) at that moment, and that can be made to fail.
struct WitnessFence {
    store: Arc<MemoryStore>,
    seen: parking_lot::Mutex<Vec<(NodeId, bool)>>,
    fail: AtomicBool,
}

#[async_trait]
impl fence::NodeFence for WitnessFence {
    async fn fence(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<fence::FenceReport, fence::FenceError> {
        let listed = self
            .store
            .load(volume)
            .await
            .unwrap()
            .is_some_and(|s| s.nodes.iter().any(|a| &a.node_id == node && a.fencing));
        self.seen.lock().push((node.clone(), listed));
        if self.fail.load(Ordering::SeqCst) {
            return Err(fence::FenceError {
                volume: volume.clone(),
                node: node.clone(),
                reason: "injected".into(),
            });
        }
        Ok(fence::FenceReport {
            method: crate::backend::Fencing::Target,
            connections: Some(1),
        })
    }
}

/// Issue 15 cases 8 and 9: a stale holder cleared at publish and a node unpublished are
/// fenced while still recorded; a failed fence frees nothing and refuses other nodes.
#[tokio::test]
async fn every_holder_is_fenced_before_it_is_freed() {
    let store = Arc::new(MemoryStore::default());
    let cluster = Arc::new(FakeCluster::default());
    let fence = Arc::new(WitnessFence {
        store: store.clone(),
        seen: Default::default(),
        fail: AtomicBool::new(false),
    });
    let (m, _) = manager_with(store.clone(), cluster.clone(), Duration::from_secs(30)).await;
    let m = m.with_fence(fence.clone());
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwo, "a").await.unwrap();
    cluster.gone.lock().push(node("a"));
    assert_eq!(
        publish(&m, &v, Sharing::Rwo, "b").await.unwrap(),
        PublishOutcome::StaleHolderCleared
    );
    assert_eq!(fence.seen.lock().as_slice(), [(node("a"), true)], "case 8");
    let s = m.state(&v).await.unwrap().unwrap();
    assert_eq!(s.fenced[0].node_id, node("a"), "the fence is noted");

    fence.fail.store(true, Ordering::SeqCst);
    let err = m.unpublish(&v, &node("b")).await.unwrap_err();
    assert!(matches!(err, AttachError::Fence(_)), "{err}");
    assert_eq!(
        m.attached_nodes(&v).await.unwrap(),
        vec![node("b")],
        "case 9"
    );
    let refused = publish(&m, &v, Sharing::Rwo, "c").await.unwrap_err();
    assert!(
        matches!(&refused, AttachError::Refused(state::PublishRefusal::Unfenced { node: n, .. }) if n == &node("b")),
        "{refused}"
    );
    fence.fail.store(false, Ordering::SeqCst);
    m.unpublish(&v, &node("b")).await.unwrap();
    assert!(fence.seen.lock().iter().all(|(_, listed)| *listed));
    publish(&m, &v, Sharing::Rwo, "c").await.unwrap();
}

/// A grant made after the node was freed is withdrawn; if that fence fails, the node is
/// recorded as leaving so its slot stays taken until the reconciler fences it.
#[tokio::test]
async fn a_late_grant_is_withdrawn_or_kept_on_record() {
    let store = Arc::new(MemoryStore::default());
    let fence = Arc::new(WitnessFence {
        store: store.clone(),
        seen: Default::default(),
        fail: AtomicBool::new(false),
    });
    let (m, _) = manager_with(store.clone(), Arc::new(Standalone), Duration::ZERO).await;
    let m = m.with_fence(fence.clone());
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwo, "a").await.unwrap();
    assert!(m.confirm_holder(&v, &node("a")).await.is_ok());
    m.unpublish(&v, &node("a")).await.unwrap();
    let err = m.confirm_holder(&v, &node("a")).await.unwrap_err();
    assert!(matches!(err, AttachError::Withdrawn { .. }), "{err}");
    fence.fail.store(true, Ordering::SeqCst);
    let err = m.confirm_holder(&v, &node("a")).await.unwrap_err();
    assert!(matches!(err, AttachError::Fence(_)), "{err}");
    let s = m.state(&v).await.unwrap().expect("recorded");
    assert!(s.nodes[0].fencing && s.nodes[0].node_id == node("a"));
    assert!(
        publish(&m, &v, Sharing::Rwo, "b").await.is_err(),
        "the slot stays taken"
    );
    fence.fail.store(false, Ordering::SeqCst);
    m.reconcile(Duration::ZERO).await.unwrap();
    publish(&m, &v, Sharing::Rwo, "b").await.unwrap();
}

#[tokio::test]
async fn rwo_holder_on_a_deleted_node_is_cleared_at_publish() {
    let cluster = Arc::new(FakeCluster::default());
    let (m, sink) = manager_with(
        Arc::new(MemoryStore::default()),
        cluster.clone(),
        Duration::from_secs(30),
    )
    .await;
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwo, "a").await.unwrap();
    assert!(publish(&m, &v, Sharing::Rwo, "b").await.is_err());
    cluster.gone.lock().push(node("a"));
    assert_eq!(
        publish(&m, &v, Sharing::Rwo, "b").await.unwrap(),
        PublishOutcome::StaleHolderCleared
    );
    assert_eq!(m.attached_nodes(&v).await.unwrap(), vec![node("b")]);
    assert!(sink.take().iter().any(
        |e| matches!(e, AttachEvent::StaleHolderCleared { holder, .. } if *holder == node("a"))
    ));
}

/// A cluster that also knows each PV's access mode.
#[derive(Default)]
struct ModeCluster {
    inner: FakeCluster,
    modes: parking_lot::Mutex<Vec<(VolumeId, Sharing)>>,
}

#[async_trait]
impl ClusterView for ModeCluster {
    async fn gone_nodes(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        self.inner.gone_nodes(nodes).await
    }
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        self.inner.attachments().await
    }
    async fn sharing_of(&self, volume: &VolumeId) -> Result<Option<Sharing>, ClusterError> {
        Ok(self
            .modes
            .lock()
            .iter()
            .find(|(v, _)| v == volume)
            .map(|(_, s)| *s))
    }
}

#[tokio::test]
async fn rwx_block_sharing_is_refused_unless_the_policy_allows_it() {
    for allow in [false, true] {
        let cluster = Arc::new(SharedClaimCluster::default());
        let m = AttachmentManager::load(
            Arc::new(MemoryStore::default()),
            cluster.clone(),
            Arc::new(RecordingSink::default()),
            Policy {
                grace_period: Duration::from_secs(30),
                allow_rwx_block_sharing: allow,
            },
        )
        .await
        .unwrap();
        let v = VolumeId::generate();
        publish(&m, &v, Sharing::Rwx, "a").await.unwrap();
        let second = publish(&m, &v, Sharing::Rwx, "b").await;
        assert_eq!(cluster.asked_to_check.load(Ordering::SeqCst), !allow);
        if allow {
            assert_eq!(second.unwrap(), PublishOutcome::MigrationStarted);
        } else {
            assert!(matches!(
                second,
                Err(AttachError::Refused(
                    PublishRefusal::SharedWithOtherWorkloads { .. }
                ))
            ));
            assert_eq!(m.attached_nodes(&v).await.unwrap(), vec![node("a")]);
        }
    }
}

/// A fence that takes a while (a storage target answering slowly).
struct SlowFence(Duration);

#[async_trait]
impl fence::NodeFence for SlowFence {
    async fn fence(
        &self,
        _volume: &VolumeId,
        _node: &NodeId,
    ) -> Result<fence::FenceReport, fence::FenceError> {
        tokio::time::sleep(self.0).await;
        Ok(fence::FenceReport {
            method: crate::backend::Fencing::Target,
            connections: Some(1),
        })
    }
}

/// Issue 16 point 18: ControllerPublish(C) overlapping ControllerUnpublish(A) on one
/// volume waits for the volume's lock (bounded) instead of answering Aborted, which costs
/// the attacher a retry after a second or more.
#[tokio::test]
async fn an_overlapping_controller_call_waits_for_the_volume_instead_of_aborting() {
    let (m, _) = manager().await;
    let m = Arc::new(m.with_fence(Arc::new(SlowFence(Duration::from_millis(400)))));
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwx, "a").await.unwrap();
    publish(&m, &v, Sharing::Rwx, "b").await.unwrap();
    let unpublish = {
        let (m, v) = (m.clone(), v.clone());
        tokio::spawn(async move { m.unpublish(&v, &node("a")).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    // A third node while A's fence holds the lock: it waits, then gets A's slot.
    let c = publish(&m, &v, Sharing::Rwx, "c").await;
    unpublish.await.unwrap().unwrap();
    assert!(c.is_ok(), "waited instead of Aborted: {c:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it did wait for the fence"
    );
    assert_eq!(
        m.attached_nodes(&v).await.unwrap(),
        vec![node("b"), node("c")]
    );
}

/// A cluster where another workload's pod uses every claim (only when asked to check).
#[derive(Default)]
struct SharedClaimCluster {
    asked_to_check: AtomicBool,
}

#[async_trait]
impl ClusterView for SharedClaimCluster {
    async fn gone_nodes(&self, _nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        Ok(vec![])
    }
    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        Ok(None)
    }
    async fn workload(
        &self,
        _volume: &VolumeId,
        _holder: &NodeId,
        _target: &NodeId,
        check_pods: bool,
    ) -> Result<Workload, ClusterError> {
        self.asked_to_check.store(check_pods, Ordering::SeqCst);
        Ok(Workload {
            foreign_pods: if check_pods {
                vec!["ns/other on b (not a KubeVirt VM)".into()]
            } else {
                vec![]
            },
            ..Workload::default()
        })
    }
}
