//! The reconciler and the rebuild at start, against fake clusters and stores.

use super::*;

#[tokio::test]
async fn attachments_of_a_replaced_driver_are_adopted_at_start() {
    let cluster = Arc::new(ModeCluster::default());
    let (rwo, rwx, unknown) = (
        VolumeId::generate(),
        VolumeId::generate(),
        VolumeId::generate(),
    );
    // Attached by the previous driver: VolumeAttachments, no state of ours.
    *cluster.inner.objects.lock() = Some(
        [(&rwo, "a"), (&rwx, "a"), (&unknown, "a")]
            .into_iter()
            .map(|(v, n)| AttachmentObject {
                volume: v.clone(),
                node: node(n),
                attached: true,
                created: None,
            })
            .collect(),
    );
    *cluster.modes.lock() = vec![(rwo.clone(), Sharing::Rwo), (rwx.clone(), Sharing::Rwx)];
    let store = Arc::new(MemoryStore::default());
    let sink = Arc::new(RecordingSink::default());
    let m = AttachmentManager::load(
        store.clone(),
        cluster.clone(),
        sink.clone(),
        Policy {
            grace_period: Duration::from_secs(30),
            allow_rwx_block_sharing: false,
        },
    )
    .await
    .unwrap();
    assert!(sink.take().iter().any(|e| matches!(
        e,
        AttachEvent::StateRepaired { volume, added, .. } if *volume == rwo && *added == vec![node("a")]
    )));
    // Persisted: a restart does not need the cluster to know it again.
    assert!(store.load(&rwo).await.unwrap().is_some());
    // An RWO volume held by node a is not handed to b behind its back.
    assert!(publish(&m, &rwo, Sharing::Rwo, "b").await.is_err());
    publish(&m, &rwo, Sharing::Rwo, "a").await.unwrap();
    // An RWX volume on node a: b becomes the migration target, a stays primary.
    assert_eq!(
        publish(&m, &rwx, Sharing::Rwx, "b").await.unwrap(),
        PublishOutcome::MigrationStarted
    );
    assert_eq!(
        m.attached_nodes(&rwx).await.unwrap(),
        vec![node("a"), node("b")]
    );
    // The PV's mode unknown: reported, not invented.
    assert!(store.load(&unknown).await.unwrap().is_none());
}

#[tokio::test]
async fn reconciler_reports_overdue_migrations_once_and_never_detaches_them() {
    let store = Arc::new(MemoryStore::default());
    let (m, sink) =
        manager_with(store.clone(), Arc::new(Standalone), Duration::from_secs(30)).await;
    let v = VolumeId::generate();
    m.publish(&v, Duration::from_secs(30), req("a", Sharing::Rwx))
        .await
        .unwrap();
    m.publish(&v, Duration::from_secs(30), req("b", Sharing::Rwx))
        .await
        .unwrap();
    // Age the migration past its deadline.
    let mut s = m.state(&v).await.unwrap().unwrap();
    s.migration_started_at = Some(Utc::now() - chrono::Duration::seconds(31));
    store.save(&s).await.unwrap();
    sink.take();
    let r = m.reconcile(Duration::ZERO).await.unwrap();
    assert_eq!(r.overdue, 1);
    let r = m.reconcile(Duration::ZERO).await.unwrap();
    assert_eq!(r.overdue, 0, "reported once");
    let overdue: Vec<_> = sink
        .take()
        .into_iter()
        .filter(|e| matches!(e, AttachEvent::MigrationOverdue { .. }))
        .collect();
    assert_eq!(overdue.len(), 1);
    assert!(m.state(&v).await.unwrap().unwrap().migration_overdue);
    assert_eq!(
        m.attached_nodes(&v).await.unwrap(),
        vec![node("a"), node("b")],
        "access never revoked"
    );
    let err = publish(&m, &v, Sharing::Rwx, "c").await.unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
}

#[tokio::test]
async fn reconciler_clears_nodes_the_cluster_lost() {
    let cluster = Arc::new(FakeCluster::default());
    let (m, _) = manager_with(
        Arc::new(MemoryStore::default()),
        cluster.clone(),
        Duration::ZERO,
    )
    .await;
    let (v1, v2) = (VolumeId::generate(), VolumeId::generate());
    publish(&m, &v1, Sharing::Rwx, "a").await.unwrap();
    publish(&m, &v1, Sharing::Rwx, "b").await.unwrap();
    publish(&m, &v2, Sharing::Rwo, "c").await.unwrap();
    *cluster.objects.lock() = Some(vec![
        AttachmentObject {
            volume: v1.clone(),
            node: node("a"),
            attached: true,
            created: None,
        },
        AttachmentObject {
            volume: v1.clone(),
            node: node("b"),
            attached: true,
            created: None,
        },
        AttachmentObject {
            volume: v2.clone(),
            node: node("c"),
            attached: true,
            created: None,
        },
    ]);
    assert!(m
        .reconcile(Duration::ZERO)
        .await
        .unwrap()
        .cleared
        .is_empty());
    // b's node is deleted; c's VolumeAttachment disappeared.
    cluster.gone.lock().push(node("b"));
    cluster.objects.lock().as_mut().unwrap().pop();
    let r = m.reconcile(Duration::ZERO).await.unwrap();
    assert_eq!(r.cleared.len(), 2, "{r:?}");
    assert_eq!(m.attached_nodes(&v1).await.unwrap(), vec![node("a")]);
    assert!(m
        .state(&v1)
        .await
        .unwrap()
        .unwrap()
        .migration_started_at
        .is_none());
    assert!(
        m.state(&v2).await.unwrap().is_none(),
        "nothing left: record reclaimed"
    );
}

#[tokio::test]
async fn rebuild_repairs_state_from_volume_attachments() {
    let store = Arc::new(MemoryStore::default());
    let (m, _) = manager_with(store.clone(), Arc::new(Standalone), Duration::ZERO).await;
    let v = VolumeId::generate();
    publish(&m, &v, Sharing::Rwx, "a").await.unwrap();
    publish(&m, &v, Sharing::Rwx, "b").await.unwrap();
    drop(m);
    let cluster = Arc::new(FakeCluster::default());
    *cluster.objects.lock() = Some(vec![AttachmentObject {
        volume: v.clone(),
        node: node("b"),
        attached: true,
        created: None,
    }]);
    let (m, sink) = {
        let sink = Arc::new(RecordingSink::default());
        let m = AttachmentManager::load(store.clone(), cluster, sink.clone(), Policy::default())
            .await
            .unwrap();
        (m, sink)
    };
    // Fence before free: a keeps its slot, marked, until the reconciler cut it off.
    assert_eq!(
        m.attached_nodes(&v).await.unwrap(),
        vec![node("a"), node("b")]
    );
    let stored = store.load_all().await.unwrap();
    assert!(stored[0].nodes[0].fencing, "repair persisted");
    assert!(sink.take().iter().any(
        |e| matches!(e, AttachEvent::StateRepaired { removed, .. } if removed == &vec![node("a")])
    ));
    let r = m.reconcile(Duration::ZERO).await.unwrap();
    assert_eq!(r.cleared, vec![(v.clone(), node("a"))]);
    assert_eq!(m.attached_nodes(&v).await.unwrap(), vec![node("b")]);
}

/// Reference model: the rules restated as plainly as possible.
#[derive(Default, Clone)]
struct Model {
    nodes: Vec<String>,
}

impl Model {
    fn publish(&mut self, sharing: Sharing, n: &str) -> bool {
        if self.nodes.iter().any(|x| x == n) {
            return true;
        }
        let limit = match sharing {
            Sharing::Rwo => 1,
            Sharing::Rwx => 2,
            Sharing::Rox => usize::MAX,
        };
        if self.nodes.len() < limit {
            self.nodes.push(n.to_string());
            true
        } else {
            false
        }
    }
    fn unpublish(&mut self, n: &str) {
        self.nodes.retain(|x| x != n);
    }
}

/// Deterministic xorshift so failures reproduce from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn random_sequences_match_the_reference_model() {
    for seed in 1..=200u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let sharing = [Sharing::Rwo, Sharing::Rwx][(seed % 2) as usize];
        let (m, _) = manager_with(
            Arc::new(MemoryStore::default()),
            Arc::new(Standalone),
            Duration::ZERO,
        )
        .await;
        let v = VolumeId::generate();
        let mut model = Model::default();
        for step in 0..60 {
            let n = ["a", "b", "c", "d"][(rng.next() % 4) as usize];
            if rng.next() % 3 == 0 {
                m.unpublish(&v, &node(n)).await.unwrap();
                model.unpublish(n);
            } else {
                let ok = publish(&m, &v, sharing, n).await.is_ok();
                assert_eq!(
                    ok,
                    model.publish(sharing, n),
                    "seed {seed} step {step}: publish {n}"
                );
            }
            let got: Vec<String> = m
                .attached_nodes(&v)
                .await
                .unwrap()
                .iter()
                .map(|n| n.to_string())
                .collect();
            assert_eq!(got, model.nodes, "seed {seed} step {step}: order differs");
            let migrating = m
                .state(&v)
                .await
                .unwrap()
                .is_some_and(|s| s.migration_started_at.is_some());
            assert_eq!(
                migrating,
                sharing == Sharing::Rwx && model.nodes.len() == 2,
                "seed {seed} step {step}"
            );
        }
    }
}

#[tokio::test]
async fn reconciler_closes_a_migration_whose_source_node_is_gone() {
    let cluster = Arc::new(FakeCluster::default());
    let (m, sink) = manager_with(
        Arc::new(MemoryStore::default()),
        cluster.clone(),
        Duration::ZERO,
    )
    .await;
    let (v1, v2) = (VolumeId::generate(), VolumeId::generate());
    for v in [&v1, &v2] {
        publish(&m, v, Sharing::Rwx, "a").await.unwrap();
        publish(&m, v, Sharing::Rwx, "b").await.unwrap();
    }
    sink.take();
    // Node a (the source of both) is deleted: both migrations complete towards b.
    cluster.gone.lock().push(node("a"));
    m.reconcile(Duration::ZERO).await.unwrap();
    for v in [&v1, &v2] {
        assert_eq!(m.attached_nodes(v).await.unwrap(), vec![node("b")]);
        assert!(m
            .state(v)
            .await
            .unwrap()
            .unwrap()
            .migration_started_at
            .is_none());
    }
    let events = sink.take();
    let completed = events
        .iter()
        .filter(|e| matches!(e, AttachEvent::MigrationEnded { source, target, outcome: MigrationOutcome::Completed, .. } if *source == node("a") && *target == node("b")))
        .count();
    assert_eq!(completed, 2, "{events:?}");
    assert!(events.iter().any(|e| matches!(e, AttachEvent::StaleHolderCleared { holder, to, .. } if *holder == node("a") && *to == node("b"))));

    // The target's node gone instead: the migration is aborted, the source stays.
    let v3 = VolumeId::generate();
    publish(&m, &v3, Sharing::Rwx, "b").await.unwrap();
    publish(&m, &v3, Sharing::Rwx, "c").await.unwrap();
    sink.take();
    cluster.gone.lock().push(node("c"));
    m.reconcile(Duration::ZERO).await.unwrap();
    assert_eq!(m.attached_nodes(&v3).await.unwrap(), vec![node("b")]);
    assert!(sink.take().iter().any(
        |e| matches!(e, AttachEvent::MigrationEnded { target, outcome: MigrationOutcome::Aborted, .. } if *target == node("c"))
    ));
}
