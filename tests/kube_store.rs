//! The controller against a fake Kubernetes API server: attachment state in PV
//! annotations, Node checks, VolumeAttachment cross-checks, Events, and API faults.

mod support;

use std::time::Duration;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use serde_json::Value;
use support::fake_kube::{self, FakeKube, Faults};
use support::*;
use tonic::Code;

const DRIVER: &str = "handoff.csi.dev";

struct Cluster {
    fake: FakeKube,
    driver: Driver,
}

async fn start() -> Cluster {
    let fake = FakeKube::start().await;
    for n in ["node-a", "node-b", "node-c"] {
        fake.put("nodes", fake_kube::node(n));
    }
    let driver = start_controller(&fake, None).await;
    Cluster { fake, driver }
}

/// Publishes an RWO block volume to `node` until the controller has seen its holder's
/// Node go (refusals meanwhile are FailedPrecondition or Aborted); false after 5 s.
async fn publish_once_the_holder_is_gone(
    ctl: &mut csi::controller_client::ControllerClient<tonic::transport::Channel>,
    id: &str,
    node: &str,
) -> bool {
    for _ in 0..100 {
        match ctl
            .controller_publish_volume(publish_request(id, node, rwo_block()))
            .await
        {
            Ok(_) => return true,
            Err(s) => assert!(
                matches!(s.code(), Code::FailedPrecondition | Code::Aborted),
                "{s:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A controller on the fake cluster; `data_dir` shares another replica's storage.
async fn start_controller(fake: &FakeKube, data_dir: Option<std::path::PathBuf>) -> Driver {
    start_controller_with(fake, data_dir, Vec::new()).await
}

async fn start_controller_with(
    fake: &FakeKube,
    data_dir: Option<std::path::PathBuf>,
    more_args: Vec<String>,
) -> Driver {
    let kubeconfig = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    fake.write_kubeconfig(&kubeconfig);
    let mut extra_args: Vec<String> = vec![
        "--attachment-store".into(),
        "kube".into(),
        "--reconcile-interval".into(),
        "1s".into(),
    ];
    extra_args.extend(more_args);
    Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args,
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        data_dir,
        ..Default::default()
    })
    .await
}

/// Creates a volume over CSI and the PV Kubernetes would create for it.
async fn volume(c: &Cluster, name: &str, cap: csi::VolumeCapability) -> String {
    let id = c
        .driver
        .controller()
        .await
        .create_volume(create_request(name, MIB, cap))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    c.fake
        .put("persistentvolumes", fake_kube::pv(name, DRIVER, &id));
    id
}

fn annotation(fake: &FakeKube, pv: &str) -> Option<Value> {
    let obj = fake.get("persistentvolumes", pv)?;
    let raw = obj["metadata"]["annotations"]["handoff.csi.dev/attachment"].as_str()?;
    Some(serde_json::from_str(raw).unwrap())
}

fn nodes_in(state: &Value) -> Vec<String> {
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn rwx() -> csi::VolumeCapability {
    block_cap(Mode::MultiNodeMultiWriter)
}

#[tokio::test]
async fn publish_state_lives_in_pv_annotations() {
    let c = start().await;
    let id = volume(&c, "pv-annot", rwx()).await;
    let mut ctl = c.driver.controller().await;
    ctl.controller_publish_volume(publish_request(&id, "node-b", rwx()))
        .await
        .unwrap();
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwx()))
        .await
        .unwrap();
    let state = annotation(&c.fake, "pv-annot").expect("state annotation written");
    assert_eq!(
        nodes_in(&state),
        ["node-b", "node-a"],
        "order kept: primary first"
    );
    assert!(state["migration_started_at"].is_string());
    let pv = c.fake.get("persistentvolumes", "pv-annot").unwrap();
    assert_eq!(
        pv["metadata"]["annotations"]["handoff.csi.dev/attached-nodes"],
        "node-b,node-a"
    );

    for n in ["node-b", "node-a"] {
        ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: n.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(
        annotation(&c.fake, "pv-annot").is_none(),
        "annotation removed when nothing is attached"
    );
}

#[tokio::test]
async fn nodes_are_checked_against_node_objects() {
    let c = start().await;
    let id = volume(&c, "pv-nodes", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    let r = ctl
        .controller_publish_volume(publish_request(&id, "node-zzz", rwo_block()))
        .await;
    assert_eq!(code(r), Code::NotFound);
    // The attacher's object exists while node-a holds the volume: only the Node's
    // deletion may clear it (the reconciler would clear a holder without one).
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-nodes", "node-a", true),
    );
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    assert_eq!(
        code(
            ctl.controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
                .await
        ),
        Code::FailedPrecondition
    );
    // node-a is deleted from the cluster (or tainted out-of-service, below): its stale
    // attachment gives way.
    c.fake.remove("nodes", "node-a");
    tokio::time::sleep(Duration::from_millis(200)).await;
    ctl.controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-nodes").unwrap()),
        ["node-b"]
    );
    wait_for("StaleAttachmentCleared event", || {
        c.fake
            .events()
            .iter()
            .any(|e| e["reason"] == "StaleAttachmentCleared")
    })
    .await;
}

#[tokio::test]
async fn conflict_storms_are_retried_then_reported_as_aborted() {
    let c = start().await;
    let id = volume(&c, "pv-409", rwx()).await;
    let mut ctl = c.driver.controller().await;
    c.fake.set_faults(Faults {
        conflicts: 3,
        ..Default::default()
    });
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwx()))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-409").unwrap()),
        ["node-a"]
    );

    c.fake.set_faults(Faults {
        conflicts: 1000,
        ..Default::default()
    });
    let status = ctl
        .controller_publish_volume(publish_request(&id, "node-b", rwx()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-409").unwrap()),
        ["node-a"],
        "nothing half-written"
    );

    c.fake.set_faults(Faults::default());
    ctl.controller_publish_volume(publish_request(&id, "node-b", rwx()))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-409").unwrap()),
        ["node-a", "node-b"]
    );
}

#[tokio::test]
async fn server_errors_give_retryable_codes_never_an_unpersisted_ok() {
    let c = start().await;
    let id = volume(&c, "pv-500", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    c.fake.set_faults(Faults {
        server_errors: 1000,
        ..Default::default()
    });
    let status = ctl
        .controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    c.fake.set_faults(Faults::default());
    assert!(annotation(&c.fake, "pv-500").is_none());
    // The refused attach left no trace: another node can take the volume.
    ctl.controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-500").unwrap()),
        ["node-b"]
    );
}

#[tokio::test]
async fn migration_survives_a_controller_crash_exactly() {
    let mut c = start().await;
    let id = volume(&c, "pv-crash", rwx()).await;
    {
        let mut ctl = c.driver.controller().await;
        for n in ["node-a", "node-b"] {
            ctl.controller_publish_volume(publish_request(&id, n, rwx()))
                .await
                .unwrap();
            c.fake.put(
                "volumeattachments",
                fake_kube::volume_attachment(DRIVER, "pv-crash", n, true),
            );
        }
    }
    // Events are best effort and sent in the background: let this one land before the kill.
    wait_for("MigrationStarted event", || {
        c.fake
            .events()
            .iter()
            .any(|e| e["reason"] == "MigrationStarted")
    })
    .await;
    let before = annotation(&c.fake, "pv-crash").unwrap();
    c.driver.crash_and_restart().await;
    let mut ctl = c.driver.controller().await;
    let refused = ctl
        .controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("migration limit"),
        "{}",
        refused.message()
    );
    for n in ["node-a", "node-b"] {
        ctl.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    let after = annotation(&c.fake, "pv-crash").unwrap();
    assert_eq!(
        after, before,
        "order, attach times and migration start survive"
    );
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for("migration events on PV and PVC", || {
        let events = c.fake.events();
        let on = |reason: &str, kind: &str| {
            events
                .iter()
                .any(|e| e["reason"] == reason && e["involvedObject"]["kind"] == kind)
        };
        on("MigrationCompleted", "PersistentVolume")
            && on("MigrationCompleted", "PersistentVolumeClaim")
            && on("AttachConflict", "PersistentVolume")
    })
    .await;
}

#[tokio::test]
async fn rebuild_repairs_state_from_volume_attachments() {
    let mut c = start().await;
    let id = volume(&c, "pv-repair", rwx()).await;
    {
        let mut ctl = c.driver.controller().await;
        for n in ["node-a", "node-b"] {
            ctl.controller_publish_volume(publish_request(&id, n, rwx()))
                .await
                .unwrap();
        }
    }
    // Only node-b has a VolumeAttachment: node-a's detach happened while we were down.
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-repair", "node-b", true),
    );
    c.driver.crash_and_restart().await;
    // Fence before free: node-a is marked for fencing at rebuild, and the reconciler
    // cuts it off before it leaves the record.
    wait_for("node-a fenced and cleared", || {
        annotation(&c.fake, "pv-repair").is_some_and(|s| nodes_in(&s) == ["node-b"])
    })
    .await;
    wait_for("AttachmentStateRepaired event", || {
        c.fake
            .events()
            .iter()
            .any(|e| e["reason"] == "AttachmentStateRepaired")
    })
    .await;
    // node-b is now the only holder: a new migration target is accepted.
    c.driver
        .controller()
        .await
        .controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap();
}

#[tokio::test]
async fn dropped_watches_recover() {
    let c = start().await;
    c.fake.drop_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A PV created after the drop must still reach the cache through the re-watch.
    let id = volume(&c, "pv-rewatch", rwo_block()).await;
    c.driver
        .controller()
        .await
        .controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-rewatch").unwrap()),
        ["node-a"]
    );
}

/// Watches that resume too late get 410 Gone and must relist: what changed while they
/// were down (here a deleted Node) is seen, and no cache goes back to the older state.
#[tokio::test]
async fn expired_watches_relist_and_see_what_changed_meanwhile() {
    let c = start().await;
    let id = volume(&c, "pv-410", rwo_block()).await;
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-410", "node-a", true),
    );
    let mut ctl = c.driver.controller().await;
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    c.fake.set_faults(Faults {
        expired_watches: 6,
        ..Default::default()
    });
    c.fake.drop_watches();
    c.fake.remove("nodes", "node-a");
    // The node's deletion reaches the controller only through the relist.
    assert!(
        publish_once_the_holder_is_gone(&mut ctl, &id, "node-b").await,
        "the relist delivered the Node's deletion"
    );
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-410").unwrap()),
        ["node-b"]
    );
    assert!(
        c.fake
            .requests()
            .iter()
            .filter(|(m, p, q)| m == "GET" && p.ends_with("/nodes") && !q.contains("watch"))
            .count()
            >= 2,
        "the Node watch relisted"
    );
}

#[tokio::test]
async fn two_controller_replicas_never_decide_on_old_state() {
    let c = start().await;
    let second = start_controller(&c.fake, Some(c.driver.data_dir())).await;
    let id = volume(&c, "pv-replicas", rwo_block()).await;
    // Replica 1 attaches; replica 2 (which started earlier than this state existed) must
    // see it before deciding, as after a leader failover.
    c.driver
        .controller()
        .await
        .controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    let mut r2 = second.controller().await;
    let mut refused = None;
    for _ in 0..50 {
        match r2
            .controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
            .await
        {
            Err(s) if s.code() == Code::FailedPrecondition => {
                refused = Some(s);
                break;
            }
            // Aborted: replica 2's watch had not caught up; its guarded write was stale.
            Err(s) if s.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("replica 2 must not attach a second RWO node: {other:?}"),
        }
    }
    assert!(refused.unwrap().message().contains("node-a"));
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-replicas").unwrap()),
        ["node-a"]
    );
    // Replica 2 detaches; replica 1 then lets node-b in.
    r2.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut r1 = c.driver.controller().await;
    let mut attached = false;
    for _ in 0..50 {
        match r1
            .controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
            .await
        {
            Ok(_) => {
                attached = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(attached);
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-replicas").unwrap()),
        ["node-b"]
    );
}

/// Random API faults (409 storms, 500s, latency, dropped watches) under a stream of
/// publishes and unpublishes: every OK must be in the PV annotation, every error must be
/// retryable, and the annotation never shows a second RWO holder.
#[tokio::test]
async fn random_api_faults_never_yield_unpersisted_oks_or_two_rwo_holders() {
    let c = start().await;
    let id = volume(&c, "pv-faults", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut oks, mut retryable) = (0, 0);
    for step in 0..60 {
        let r = next();
        c.fake.set_faults(Faults {
            conflicts: (r % 4) as usize,
            server_errors: ((r >> 8) % 3) as usize,
            latency: Duration::from_millis((r >> 16) % 15),
            ..Default::default()
        });
        if (r >> 24) % 10 == 0 {
            c.fake.drop_watches();
        }
        let node = ["node-a", "node-b"][((r >> 32) % 2) as usize];
        let result = if (r >> 40) % 2 == 0 {
            ctl.controller_publish_volume(publish_request(&id, node, rwo_block()))
                .await
                .map(drop)
        } else {
            ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.into(),
                ..Default::default()
            })
            .await
            .map(drop)
        };
        let stored = annotation(&c.fake, "pv-faults")
            .map(|s| nodes_in(&s))
            .unwrap_or_default();
        assert!(
            stored.len() <= 1,
            "step {step}: two RWO holders stored: {stored:?}"
        );
        match result {
            Ok(()) => {
                oks += 1;
                if (r >> 40) % 2 == 0 {
                    assert_eq!(stored, [node], "step {step}: publish OK but not persisted");
                } else {
                    assert!(
                        !stored.contains(&node.to_string()),
                        "step {step}: unpublish OK but still stored"
                    );
                }
            }
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::Aborted
                            | Code::DeadlineExceeded
                            | Code::FailedPrecondition
                    ),
                    "step {step}: not a retryable/decided code: {s:?}"
                );
                retryable += 1;
            }
        }
    }
    c.fake.set_faults(Faults::default());
    assert!(
        oks > 10,
        "faults should not block everything: {oks} OK, {retryable} errors"
    );
}

#[tokio::test]
async fn out_of_service_nodes_count_as_gone() {
    let c = start().await;
    let id = volume(&c, "pv-oos", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    let mut tainted = fake_kube::node("node-a");
    tainted["spec"] = serde_json::json!({"taints": [{"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}]});
    c.fake.put("nodes", tainted);
    // The taint reaches the controller through its node watch: retry as the attacher would.
    let mut published = false;
    for _ in 0..200 {
        if ctl
            .controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        published,
        "an out-of-service holder should give way to node-b"
    );
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-oos").unwrap()),
        ["node-b"]
    );
}

#[tokio::test]
async fn volumes_attached_by_a_replaced_driver_are_adopted_at_start() {
    let mut c = start().await;
    let rwx_id = volume(&c, "pv-adopt-rwx", rwx()).await;
    let rwo_id = volume(&c, "pv-adopt-rwo", block_cap(Mode::SingleNodeWriter)).await;
    // The PVs as Kubernetes has them: modes from the claims.
    let mut pv = fake_kube::pv("pv-adopt-rwx", DRIVER, &rwx_id);
    pv["spec"]["volumeMode"] = "Block".into();
    c.fake.put("persistentvolumes", pv);
    let mut pv = fake_kube::pv("pv-adopt-rwo", DRIVER, &rwo_id);
    pv["spec"]["accessModes"] = serde_json::json!(["ReadWriteOnce"]);
    pv["spec"]["volumeMode"] = "Block".into();
    c.fake.put("persistentvolumes", pv);
    // Attached to node-a by the driver this one replaced: VolumeAttachments only.
    for pv in ["pv-adopt-rwx", "pv-adopt-rwo"] {
        c.fake.put(
            "volumeattachments",
            fake_kube::volume_attachment(DRIVER, pv, "node-a", true),
        );
    }
    assert!(annotation(&c.fake, "pv-adopt-rwo").is_none());
    c.driver.crash_and_restart().await;
    for pv in ["pv-adopt-rwx", "pv-adopt-rwo"] {
        let state = annotation(&c.fake, pv).unwrap_or_else(|| panic!("{pv} not adopted"));
        assert_eq!(nodes_in(&state), ["node-a"], "{pv}");
    }
    let mut ctl = c.driver.controller().await;
    // The RWO volume is not handed to node-b behind node-a's back…
    let err = ctl
        .controller_publish_volume(publish_request(&rwo_id, "node-b", rwo_block()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    // …and the RWX one gets node-b as its migration target, node-a staying primary.
    ctl.controller_publish_volume(publish_request(&rwx_id, "node-b", rwx()))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-adopt-rwx").unwrap()),
        ["node-a", "node-b"]
    );
}

fn unpublish(id: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

fn lag(resource: &str, by: Duration) -> Faults {
    Faults {
        watch_lag: [(resource.to_owned(), by)].into(),
        ..Default::default()
    }
}

/// Issue 15 case 1: with the PV watch seconds behind, a publish must not answer "already
/// attached" from the old event: every OK rests on what the API server holds.
#[tokio::test]
async fn a_lagging_pv_watch_never_yields_an_ok_without_state() {
    let c = start().await;
    let id = volume(&c, "pv-lag", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.fake
        .set_faults(lag("persistentvolumes", Duration::from_millis(1500)));
    // The attacher's object for A exists throughout (only its publish state changes).
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-lag", "node-a", true),
    );
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    ctl.controller_unpublish_volume(unpublish(&id, "node-a"))
        .await
        .unwrap();
    // The first publish's event lands now, after the unpublish: a cache applying it
    // without a version check shows A attached again.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    let state = annotation(&c.fake, "pv-lag").expect("the OK publish was stored");
    assert_eq!(nodes_in(&state), ["node-a"], "every OK is durable");
    // Once the old events have landed, B is still refused: A holds the volume.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = ctl
        .controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-lag").unwrap()),
        ["node-a"]
    );
}

/// Issue 15 case 2: a VolumeAttachment watch stuck silently must not make the reconciler
/// strip a live holder.
#[tokio::test]
async fn a_stuck_volume_attachment_watch_never_clears_a_live_holder() {
    let c = start().await;
    let id = volume(&c, "pv-stuck", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    c.fake.set_faults(Faults {
        stalled: ["volumeattachments".to_owned()].into(),
        ..Default::default()
    });
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-stuck", "node-a", true),
    );
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    // Reconcile interval 1 s, minimum age 2 s: several passes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-stuck").expect("state kept")),
        ["node-a"]
    );
    let r = ctl
        .controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
}

/// Issue 15 case 3: two PVs with one volumeHandle are refused, not split.
#[tokio::test]
async fn two_pvs_with_one_volume_handle_are_quarantined() {
    let c = start().await;
    let id = volume(&c, "pv-dup-1", rwo_block()).await;
    c.fake
        .put("persistentvolumes", fake_kube::pv("pv-dup-2", DRIVER, &id));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ctl = c.driver.controller().await;
    for n in ["node-a", "node-b"] {
        let status = ctl
            .controller_publish_volume(publish_request(&id, n, rwo_block()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let m = status.message();
        assert!(m.contains("pv-dup-1") && m.contains("pv-dup-2"), "{m}");
    }
    assert!(annotation(&c.fake, "pv-dup-1").is_none());
    assert!(annotation(&c.fake, "pv-dup-2").is_none());
}

/// Issue 15 case 6: one unreadable annotation on an attached volume neither stops the
/// controller nor blocks other volumes; its own publishes say how to repair it.
#[tokio::test]
async fn an_unreadable_annotation_quarantines_one_volume_and_the_controller_starts() {
    let c = start().await;
    let bad = volume(&c, "pv-bad", rwo_block()).await;
    let good = volume(&c, "pv-good", rwo_block()).await;
    // The bad volume is attached to node-a, and its record is then damaged.
    let mut pv = c.fake.get("persistentvolumes", "pv-bad").unwrap();
    pv["metadata"]["annotations"] = serde_json::json!({"handoff.csi.dev/attachment": "{not json"});
    c.fake.put("persistentvolumes", pv);
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-bad", "node-a", true),
    );
    // A replica starting now must come up (it used to exit 1 on this object).
    let second = start_controller(&c.fake, Some(c.driver.data_dir())).await;
    for d in [&c.driver, &second] {
        let mut ctl = d.controller().await;
        let status = ctl
            .controller_publish_volume(publish_request(&bad, "node-b", rwo_block()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("kubectl annotate pv pv-bad"),
            "{status:?}"
        );
    }
    wait_for("AttachmentQuarantined event on the PV", || {
        c.fake.events().iter().any(|e| {
            e["reason"] == "AttachmentQuarantined" && e["involvedObject"]["name"] == "pv-bad"
        })
    })
    .await;
    let mut ctl = second.controller().await;
    ctl.controller_publish_volume(publish_request(&good, "node-a", rwo_block()))
        .await
        .unwrap();
}

fn lease_holder(fake: &FakeKube) -> Option<String> {
    fake.get_in("leases", "handoff-csi", "handoff-csi-background")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// Only the replica holding the driver's own Lease runs background work: while another
/// holder renews it, nothing is reconciled here; once it lapses, this replica takes it
/// over and acts.
#[tokio::test]
async fn only_the_background_lease_holder_reconciles() {
    let fake = FakeKube::start().await;
    for n in ["node-a", "node-b"] {
        fake.put("nodes", fake_kube::node(n));
    }
    let renew = |fake: &FakeKube| {
        let now = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        fake.put_in(
            "leases",
            "handoff-csi",
            serde_json::json!({"metadata": {"name": "handoff-csi-background"},
                "spec": {"holderIdentity": "other-replica", "leaseDurationSeconds": 3,
                         "renewTime": now, "acquireTime": now}}),
        );
    };
    renew(&fake);
    let kubeconfig = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    fake.write_kubeconfig(&kubeconfig);
    let driver = Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--attachment-store".into(),
            "kube".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            "--lease-duration".into(),
            "3s".into(),
            "--lease-identity".into(),
            "replica-1".into(),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        ..Default::default()
    })
    .await;
    let c = Cluster { fake, driver };
    // An attachment whose VolumeAttachment is gone: work for the reconciler.
    let id = volume(&c, "pv-lease", rwo_block()).await;
    c.driver
        .controller()
        .await
        .controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    for _ in 0..10 {
        renew(&c.fake);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(lease_holder(&c.fake).as_deref(), Some("other-replica"));
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-lease").unwrap()),
        ["node-a"],
        "no reconcile while another replica holds the lease"
    );
    // The other replica stops renewing: this one takes over and does the work.
    wait_for("lease taken over", || {
        lease_holder(&c.fake).as_deref() == Some("replica-1")
    })
    .await;
    wait_for("reconciled by the new holder", || {
        annotation(&c.fake, "pv-lease").is_none_or(|s| nodes_in(&s).is_empty())
    })
    .await;
}

/// A controller replica (identity, shared data dir) with a short background lease.
async fn replica(fake: &FakeKube, identity: &str, data_dir: Option<std::path::PathBuf>) -> Driver {
    let kubeconfig = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    fake.write_kubeconfig(&kubeconfig);
    Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--attachment-store".into(),
            "kube".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            "--lease-duration".into(),
            "3s".into(),
            "--lease-identity".into(),
            identity.into(),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        data_dir,
        ..Default::default()
    })
    .await
}

/// The leader is killed in the middle of a live migration: the other replica decides on
/// the stored state (the migration's two nodes, nothing more), takes over the background
/// lease, and completes the migration when the source is unpublished.
#[tokio::test]
async fn a_leader_killed_mid_migration_hands_over_cleanly() {
    let fake = FakeKube::start().await;
    for n in ["node-a", "node-b", "node-c"] {
        fake.put("nodes", fake_kube::node(n));
    }
    let mut leader = replica(&fake, "replica-1", None).await;
    wait_for("replica-1 holds the lease", || {
        lease_holder(&fake).as_deref() == Some("replica-1")
    })
    .await;
    let standby = replica(&fake, "replica-2", Some(leader.data_dir())).await;
    let c = Cluster {
        fake: fake.clone(),
        driver: standby,
    };
    let id = {
        let mut l = leader.controller().await;
        let id = l
            .create_volume(create_request("pv-failover", MIB, rwx()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        fake.put(
            "persistentvolumes",
            fake_kube::pv("pv-failover", DRIVER, &id),
        );
        for n in ["node-a", "node-b"] {
            fake.put(
                "volumeattachments",
                fake_kube::volume_attachment(DRIVER, "pv-failover", n, true),
            );
            let mut published = false;
            for _ in 0..40 {
                if l.controller_publish_volume(publish_request(&id, n, rwx()))
                    .await
                    .is_ok()
                {
                    published = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(published, "publish to {n}");
        }
        id
    };
    let during = annotation(&fake, "pv-failover").unwrap();
    assert_eq!(nodes_in(&during), ["node-a", "node-b"]);
    leader.stop(nix::sys::signal::Signal::SIGKILL);

    let mut s = c.driver.controller().await;
    let refused = s
        .controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("migration limit"), "{refused:?}");
    s.controller_publish_volume(publish_request(&id, "node-b", rwx()))
        .await
        .expect("the target's retry is idempotent on the new leader");
    wait_for("replica-2 took the lease over", || {
        lease_holder(&fake).as_deref() == Some("replica-2")
    })
    .await;
    fake.remove("volumeattachments", "csi-pv-failover-node-a");
    s.controller_unpublish_volume(unpublish(&id, "node-a"))
        .await
        .unwrap();
    assert_eq!(
        nodes_in(&annotation(&fake, "pv-failover").unwrap()),
        ["node-b"]
    );
    wait_for("MigrationCompleted event", || {
        fake.events()
            .iter()
            .any(|e| e["reason"] == "MigrationCompleted")
    })
    .await;
}

/// Issue 16 point 5: a PV's annotations are limited to 256 KiB in all. A ReadOnlyMany
/// volume read by 2,000 nodes still fits (its readers are stored as one group of names),
/// and a change that would not fit is refused with ResourceExhausted before the API
/// server refuses it, nothing changed.
#[tokio::test]
async fn two_thousand_readers_fit_the_annotation_budget_and_past_it_the_refusal_is_clear() {
    let c = start().await;
    const READERS: usize = 2000;
    for i in 0..READERS {
        c.fake
            .put("nodes", fake_kube::node(&format!("reader-node-{i:04}")));
    }
    c.fake.put("nodes", fake_kube::node("reader-node-late"));
    let cap = block_cap(Mode::MultiNodeReaderOnly);
    let id = volume(&c, "pv-rox", cap.clone()).await;
    let mut pv = c.fake.get("persistentvolumes", "pv-rox").unwrap();
    pv["spec"]["accessModes"] = serde_json::json!(["ReadOnlyMany"]);
    c.fake.put("persistentvolumes", pv);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..READERS {
        // As the attacher does: a VolumeAttachment per node (the reconciler clears
        // holders without one).
        c.fake.put(
            "volumeattachments",
            fake_kube::volume_attachment(DRIVER, "pv-rox", &format!("reader-node-{i:04}"), true),
        );
    }
    let mut ctl = c.driver.controller().await;
    let publish_reader = |i: usize| {
        let mut req = publish_request(&id, &format!("reader-node-{i:04}"), cap.clone());
        req.readonly = true;
        req
    };
    for i in 0..8 {
        ctl.controller_publish_volume(publish_reader(i))
            .await
            .unwrap();
    }
    // 1,991 more readers as the driver stores them (publishing each over the API would
    // take minutes here), then the 2,000th through the driver.
    let raw = c.fake.get("persistentvolumes", "pv-rox").unwrap()["metadata"]["annotations"]
        ["handoff.csi.dev/attachment"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(raw.contains("\"readers\""), "stored as a group: {raw}");
    let mut state = handoff_csi::kube::pv_store::decode(&raw).unwrap();
    assert_eq!(state.nodes.len(), 8);
    let template = state.nodes[0].clone();
    for i in 8..READERS - 1 {
        let mut n = template.clone();
        n.node_id = handoff_csi::ids::NodeId::parse(&format!("reader-node-{i:04}")).unwrap();
        state.nodes.push(n);
    }
    let mut pv = c.fake.get("persistentvolumes", "pv-rox").unwrap();
    pv["metadata"]["annotations"]["handoff.csi.dev/attachment"] =
        Value::String(handoff_csi::kube::pv_store::encode(&state));
    c.fake.put("persistentvolumes", pv);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    ctl.controller_publish_volume(publish_reader(READERS - 1))
        .await
        .unwrap();
    eprintln!("publish of reader {READERS}: {:?}", started.elapsed());
    let obj = c.fake.get("persistentvolumes", "pv-rox").unwrap();
    let annotations = obj["metadata"]["annotations"].as_object().unwrap();
    let bytes: usize = annotations
        .iter()
        .map(|(k, v)| k.len() + v.as_str().unwrap().len())
        .sum();
    assert!(bytes < 256 * 1024, "{bytes} bytes");
    eprintln!("annotations of a {READERS}-reader volume: {bytes} bytes");
    assert!(annotations["handoff.csi.dev/attached-nodes"]
        .as_str()
        .unwrap()
        .starts_with("2000 nodes"));
    // Someone's large annotation (a kubectl last-applied-configuration, say) leaves too
    // little room for one more reader: refused, with the reason; nothing changed.
    let mut pv = c.fake.get("persistentvolumes", "pv-rox").unwrap();
    pv["metadata"]["annotations"]["example.com/big"] = Value::String("x".repeat(220 * 1024));
    c.fake.put("persistentvolumes", pv);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = c.fake.get("persistentvolumes", "pv-rox").unwrap()["metadata"]["annotations"]
        ["handoff.csi.dev/attachment"]
        .clone();
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-rox", "reader-node-late", false),
    );
    let mut req = publish_request(&id, "reader-node-late", cap.clone());
    req.readonly = true;
    let refused = ctl.controller_publish_volume(req).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("262144") && refused.message().contains("nothing was changed"),
        "{}",
        refused.message()
    );
    let after = c.fake.get("persistentvolumes", "pv-rox").unwrap()["metadata"]["annotations"]
        ["handoff.csi.dev/attachment"]
        .clone();
    assert_eq!(before, after);
    // The readers already there keep their publish (idempotent, nothing to write).
    let mut again = publish_request(&id, "reader-node-0042", cap.clone());
    again.readonly = true;
    ctl.controller_publish_volume(again).await.unwrap();
}

/// Issue 16 point 6: external-attacher passes the node id from CSINode, which is what
/// NodeGetInfo reported — not necessarily the Node's name. Such a node is known, its
/// VolumeAttachment (named by Node) counts for it, and an id no CSINode lists is
/// refused with what to check.
#[tokio::test]
async fn node_ids_resolve_through_csinode_when_they_differ_from_node_names() {
    let c = start().await;
    c.fake.put("nodes", fake_kube::node("worker-1"));
    c.fake.put(
        "csinodes",
        fake_kube::csinode("worker-1", DRIVER, "worker-1.lab.example"),
    );
    let id = volume(&c, "pv-csinode", rwo_block()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The attacher's object names the Node; it carries no node-id annotation here.
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-csinode", "worker-1", true),
    );
    let mut ctl = c.driver.controller().await;
    ctl.controller_publish_volume(publish_request(&id, "worker-1.lab.example", rwo_block()))
        .await
        .unwrap();
    // Several reconciler passes: the holder has its VolumeAttachment, so it stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let state = annotation(&c.fake, "pv-csinode").expect("still attached");
    assert_eq!(nodes_in(&state), ["worker-1.lab.example"]);
    let unknown = ctl
        .controller_publish_volume(publish_request(&id, "worker-9.lab.example", rwo_block()))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("CSINode") && unknown.message().contains("--node-id"),
        "{}",
        unknown.message()
    );
}

/// Issue 16 point 7: after a gone node's holder was cleared, external-attacher's resync
/// finds that node's VolumeAttachment unlisted and publishes it again, retrying with
/// backoff for as long as it fails. The driver answers the same every time, changes
/// nothing, and records one Event, not one per retry.
#[tokio::test]
async fn the_attachers_resync_of_a_cleared_node_gets_quiet_and_correct_answers() {
    let c = start().await;
    let id = volume(&c, "pv-resync", rwo_block()).await;
    let mut ctl = c.driver.controller().await;
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-resync", "node-a", true),
    );
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    // node-a is deleted; the workload moves to node-b: the stale holder is cleared.
    c.fake.remove("nodes", "node-a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-resync", "node-b", true),
    );
    ctl.controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
        .await
        .unwrap();
    // node-a is reinstalled under its old name while its VolumeAttachment lingers.
    c.fake.put("nodes", fake_kube::node("node-a"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sim = support::attacher::AttacherSim {
        scale: 0.02, // 1 s → 20 ms, 5 min → 6 s; resync 60 s → 1.2 s
        resync: Duration::from_secs(60),
        driver: DRIVER.into(),
    };
    let pv_id = id.clone();
    let history = sim
        .run(
            &c.fake,
            &mut ctl,
            |pv| (pv == "pv-resync").then(|| pv_id.clone()),
            rwo_block(),
            Duration::from_secs(4),
        )
        .await;
    let a = history
        .get("csi-pv-resync-node-a")
        .expect("node-a's VA was resynced");
    assert!(a.calls >= 5, "the attacher retried: {a:?}");
    assert!(
        a.codes.iter().all(|c| *c == Code::FailedPrecondition),
        "{a:?}"
    );
    assert!(
        a.messages.windows(2).all(|w| w[0] == w[1]),
        "one stable answer: {a:?}"
    );
    assert!(
        !history.contains_key("csi-pv-resync-node-b"),
        "node-b is listed, never resynced"
    );
    let state = annotation(&c.fake, "pv-resync").unwrap();
    assert_eq!(nodes_in(&state), ["node-b"]);
    let conflicts = c
        .fake
        .events()
        .into_iter()
        .filter(|e| {
            e["reason"] == "AttachConflict" && e["involvedObject"]["kind"] == "PersistentVolume"
        })
        .count();
    assert_eq!(conflicts, 1, "{} retries, one Event", a.calls);
}

/// Issue 16 point 8: resourceVersions are opaque. With an API server whose versions are
/// no numbers and do not sort in the order written, the driver only passes them back:
/// guarded writes (409 retried against the new token), watches resumed from the token
/// last seen, a relist after an unknown one, and the caches follow every change.
#[tokio::test]
async fn opaque_resource_versions_are_only_passed_back() {
    let fake = FakeKube::start().await;
    fake.use_opaque_resource_versions();
    for n in ["node-a", "node-b", "node-c"] {
        fake.put("nodes", fake_kube::node(n));
    }
    let port = free_port();
    let driver = start_controller_with(
        &fake,
        None,
        vec!["--metrics-addr".into(), format!("127.0.0.1:{port}")],
    )
    .await;
    let c = Cluster { fake, driver };
    // The attached_volumes gauge is drawn from the PV cache, which must follow every
    // version however its token sorts.
    let attached = |node: &str| -> Option<f64> {
        let series = format!("handoff_csi_attached_volumes{{node=\"{node}\"}}");
        http_get(port, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
    };
    let id = volume(&c, "pv-opaque", rwo_block()).await;
    let rv = |c: &Cluster| -> String {
        c.fake.get("persistentvolumes", "pv-opaque").unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = rv(&c);
    assert!(before.parse::<u64>().is_err(), "opaque: {before}");
    c.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, "pv-opaque", "node-a", true),
    );
    let mut ctl = c.driver.controller().await;
    // A guarded write through a conflict storm: each retry re-reads the token.
    c.fake.set_faults(Faults {
        conflicts: 3,
        ..Default::default()
    });
    ctl.controller_publish_volume(publish_request(&id, "node-a", rwo_block()))
        .await
        .unwrap();
    c.fake.set_faults(Faults::default());
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-opaque").unwrap()),
        ["node-a"]
    );
    assert_ne!(rv(&c), before);
    // Another node is refused while node-a holds the volume…
    let refused = ctl
        .controller_publish_volume(publish_request(&id, "node-b", rwo_block()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // …until node-a's deletion reaches the controller through watches resumed from an
    // opaque token, and once through a relist (410 for the first resumes).
    c.fake.set_faults(Faults {
        expired_watches: 2,
        ..Default::default()
    });
    c.fake.drop_watches();
    c.fake.remove("nodes", "node-a");
    assert!(
        publish_once_the_holder_is_gone(&mut ctl, &id, "node-b").await,
        "the Node's deletion arrived"
    );
    assert_eq!(
        nodes_in(&annotation(&c.fake, "pv-opaque").unwrap()),
        ["node-b"]
    );
    wait_for("the cache to show node-b's attach", || {
        attached("node-b") == Some(1.0) && attached("node-a").is_none()
    })
    .await;
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let left = annotation(&c.fake, "pv-opaque").unwrap();
    assert!(nodes_in(&left).is_empty(), "{left}");
    assert_eq!(left["released"]["node_id"], "node-b", "RWO grace record");
    wait_for("the cache to show the detach", || {
        attached("node-b").is_none()
    })
    .await;
    // Every watch started from a token this server wrote (or from none).
    let resumed: Vec<String> = c
        .fake
        .requests()
        .into_iter()
        .filter(|(_, _, q)| q.contains("watch=true"))
        .filter_map(|(_, _, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion=").map(str::to_owned))
        })
        .collect();
    assert!(
        resumed.iter().any(|v| v.starts_with("opaque.")),
        "watches resumed from opaque tokens: {resumed:?}"
    );
    assert!(
        resumed
            .iter()
            .all(|v| v.starts_with("opaque.") || v == "0" || v.is_empty()),
        "a watch from a version this server never wrote: {resumed:?}"
    );
}
