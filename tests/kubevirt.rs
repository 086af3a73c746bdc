//! KubeVirt-aware migrations against the fake API server, with KubeVirt's real sequence
//! (support/kubevirt_sim.rs): at the target's ControllerPublish only the target pod names
//! the migration, so each dual attach is tied to its VirtualMachineInstanceMigration
//! through that pod; the outcome follows the migration's phase, the deadline follows
//! KubeVirt's clock (published after the attach), and a second node is attached only for
//! the VM that already holds the disk. Each scenario plays the calls external-attacher
//! makes.

mod support;

use std::time::Duration;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use serde_json::Value;
use support::fake_kube::{self, FakeKube};
use support::kubevirt_sim::Migration;
use support::*;
use tonic::Code;

const DRIVER: &str = "handoff.csi.dev";
const NS: &str = "vms";
const VMIMS: &str = "virtualmachineinstancemigrations";

struct Kv {
    fake: FakeKube,
    driver: Driver,
    port: u16,
    kubeconfig: std::path::PathBuf,
}

async fn start(kubevirt: bool) -> Kv {
    let fake = FakeKube::start().await;
    // The API server's versions are only passed back (issue 16 point 8).
    fake.use_opaque_resource_versions();
    for n in ["node-a", "node-b", "node-c"] {
        fake.put("nodes", fake_kube::node(n));
    }
    if kubevirt {
        fake.install_kubevirt();
    }
    let kubeconfig = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    fake.write_kubeconfig(&kubeconfig);
    let port = free_port();
    let driver = Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--attachment-store".into(),
            "kube".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        ..Default::default()
    })
    .await;
    Kv {
        fake,
        driver,
        port,
        kubeconfig,
    }
}

fn rwx() -> csi::VolumeCapability {
    block_cap(Mode::MultiNodeMultiWriter)
}

struct Disk {
    pv: String,
    id: String,
}

/// A VM disk: an RWX block volume, its PV bound to claim `claim-<pv>` in `vms`.
async fn disk(kv: &Kv, pv: &str) -> Disk {
    let id = kv
        .driver
        .controller()
        .await
        .create_volume(create_request(pv, MIB, rwx()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    kv.fake
        .put("persistentvolumes", fake_kube::pv(pv, DRIVER, &id));
    Disk { pv: pv.into(), id }
}

/// A running VM `vm` on node-a using the disk of `pv`, with its virt-launcher pod.
fn vm_on_a(kv: &Kv, vm: &str, pv: &str, memory: &str) {
    let claim = format!("claim-{pv}");
    kv.fake.put_in(
        "virtualmachineinstances",
        NS,
        fake_kube::vmi(vm, &claim, "node-a", memory),
    );
    kv.fake.put_in(
        "pods",
        NS,
        fake_kube::launcher_pod(&format!("virt-launcher-{vm}-a"), vm, &claim, "node-a"),
    );
}

/// KubeVirt starts migrating `vm` to `node`: the object, then its target pod there.
fn migrate(kv: &Kv, name: &str, vm: &str, pv: &str, node: &str) -> Migration {
    Migration::start(&kv.fake, name, vm, &format!("claim-{pv}"), node)
}

/// Watches deliver in milliseconds; this leaves them room on a loaded machine.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

/// ControllerPublish as external-attacher does it: the VolumeAttachment exists first
/// and is marked attached once the call succeeds.
async fn publish(kv: &Kv, d: &Disk, node: &str) -> Result<(), tonic::Status> {
    kv.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, &d.pv, node, false),
    );
    kv.driver
        .controller()
        .await
        .controller_publish_volume(publish_request(&d.id, node, rwx()))
        .await?;
    kv.fake.put(
        "volumeattachments",
        fake_kube::volume_attachment(DRIVER, &d.pv, node, true),
    );
    Ok(())
}

async fn try_unpublish(kv: &Kv, d: &Disk, node: &str) -> Result<(), tonic::Status> {
    kv.driver
        .controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: d.id.clone(),
            node_id: node.into(),
            ..Default::default()
        })
        .await?;
    kv.fake
        .remove("volumeattachments", &format!("csi-{}-{node}", d.pv));
    Ok(())
}

async fn unpublish(kv: &Kv, d: &Disk, node: &str) {
    try_unpublish(kv, d, node).await.unwrap();
}

fn state(kv: &Kv, pv: &str) -> Value {
    let obj = kv.fake.get("persistentvolumes", pv).expect("PV");
    let raw = obj["metadata"]["annotations"]["handoff.csi.dev/attachment"]
        .as_str()
        .unwrap_or("null");
    serde_json::from_str(raw).unwrap()
}

fn nodes(state: &Value) -> Vec<String> {
    state["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["node_id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Messages of the Events with `reason` on `kind` objects, waiting up to 5 s for them.
async fn events(kv: &Kv, reason: &str, kind: &str) -> Vec<String> {
    for _ in 0..100 {
        let found: Vec<String> = kv
            .fake
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason && e["involvedObject"]["kind"] == kind)
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect();
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Vec::new()
}

fn metrics(kv: &Kv) -> String {
    http_get(kv.port, "/metrics").1
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn successful_migration_is_named_timed_by_the_vmi_and_completed_by_its_phase() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-ok").await;
    vm_on_a(&kv, "vm-ok", "pv-ok", "4Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    let mut mig = migrate(&kv, "mig-ok", "vm-ok", "pv-ok", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();

    let s = state(&kv, "pv-ok");
    assert_eq!(nodes(&s), ["node-a", "node-b"]);
    assert_eq!(s["migration"]["name"], "mig-ok");
    assert_eq!(s["migration"]["uid"], "vmim-uid-mig-ok");
    assert_eq!(s["migration"]["vmi"], "vm-ok");
    // 4 GiB guest: 150 s × 5 GB (KubeVirt rounds up in GB) + 900 s target start-up.
    assert_eq!(s["migration_timeout_secs"], 1650);
    assert_eq!(s["deadline_basis"]["from"], "kubevirt");
    let started = events(&kv, "MigrationStarted", "VirtualMachineInstance").await;
    assert!(started[0].contains("vms/mig-ok"), "{started:?}");
    assert!(!events(&kv, "MigrationStarted", "PersistentVolumeClaim")
        .await
        .is_empty());
    let m = metrics(&kv);
    assert!(
        m.contains("migration=\"vms/mig-ok\",source=\"node-a\",target=\"node-b\""),
        "{m}"
    );

    // Hand-off, run, success; then A is detached.
    mig.complete();
    settle().await;
    unpublish(&kv, &id, "node-a").await;
    assert_eq!(nodes(&state(&kv, "pv-ok")), ["node-b"]);
    let done = events(&kv, "MigrationCompleted", "VirtualMachineInstance").await;
    assert!(
        done[0].contains("vms/mig-ok") && done[0].contains("phase Succeeded"),
        "{done:?}"
    );
    let m = metrics(&kv);
    assert_eq!(
        metric(&m, "handoff_csi_migrations_total{result=\"completed\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "handoff_csi_migrations_active"), Some(0.0));
    assert!(!m.contains("migration=\"vms/mig-ok\""), "{m}");
}

#[tokio::test]
async fn cancelled_before_handoff_is_aborted_and_the_source_stays() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-cancel").await;
    vm_on_a(&kv, "vm-c", "pv-cancel", "2Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    let mig = migrate(&kv, "mig-c", "vm-c", "pv-cancel", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    // `virtctl migrate-cancel` deletes the migration object; the target pod goes.
    mig.cancel();
    settle().await;
    unpublish(&kv, &id, "node-b").await;
    let s = state(&kv, "pv-cancel");
    assert_eq!(nodes(&s), ["node-a"]);
    assert!(s.get("migration").is_none() && s.get("migration_started_at").is_none());
    let aborted = events(&kv, "MigrationAborted", "PersistentVolume").await;
    assert!(
        aborted[0].contains("vms/mig-c") && aborted[0].contains("detach order"),
        "{aborted:?}"
    );
    assert_eq!(
        metric(
            &metrics(&kv),
            "handoff_csi_migrations_total{result=\"aborted\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn failed_after_handoff_is_reported_failed_from_the_phase() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-fail").await;
    vm_on_a(&kv, "vm-f", "pv-fail", "1Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    let mut mig = migrate(&kv, "mig-f", "vm-f", "pv-fail", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    // The guest moved, then the migration failed (post-copy lost): the source goes
    // first, but the outcome is the phase's, not detach order's.
    mig.hand_off(Migration::default_config());
    mig.run(chrono::Utc::now());
    mig.fail();
    settle().await;
    unpublish(&kv, &id, "node-a").await;
    assert_eq!(nodes(&state(&kv, "pv-fail")), ["node-b"]);
    let failed = events(&kv, "MigrationFailed", "VirtualMachineInstance").await;
    assert!(
        failed[0].contains("vms/mig-f") && failed[0].contains("phase Failed"),
        "{failed:?}"
    );
    assert_eq!(
        metric(
            &metrics(&kv),
            "handoff_csi_migrations_total{result=\"failed\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_retry_to_a_new_target_is_its_own_migration() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-retry").await;
    vm_on_a(&kv, "vm-r", "pv-retry", "2Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    let mut first = migrate(&kv, "mig-r1", "vm-r", "pv-retry", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    // B fails: KubeVirt marks it Failed and deletes the target pod; B is detached.
    first.fail();
    settle().await;
    unpublish(&kv, &id, "node-b").await;
    assert_eq!(nodes(&state(&kv, "pv-retry")), ["node-a"]);
    // B' = node-c succeeds.
    let mut second = migrate(&kv, "mig-r2", "vm-r", "pv-retry", "node-c");
    settle().await;
    publish(&kv, &id, "node-c").await.unwrap();
    assert_eq!(state(&kv, "pv-retry")["migration"]["name"], "mig-r2");
    second.complete();
    settle().await;
    unpublish(&kv, &id, "node-a").await;
    assert_eq!(nodes(&state(&kv, "pv-retry")), ["node-c"]);
    let failed = events(&kv, "MigrationFailed", "PersistentVolume").await;
    assert!(
        failed.iter().any(|m| m.contains("vms/mig-r1")),
        "{failed:?}"
    );
    let done = events(&kv, "MigrationCompleted", "PersistentVolume").await;
    assert!(done.iter().any(|m| m.contains("vms/mig-r2")), "{done:?}");
    let m = metrics(&kv);
    assert_eq!(
        metric(&m, "handoff_csi_migrations_total{result=\"started\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "handoff_csi_migrations_total{result=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "handoff_csi_migrations_total{result=\"completed\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn force_detach_without_unstage_and_unpublish_after_a_failed_publish_are_ok() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-force").await;
    vm_on_a(&kv, "vm-x", "pv-force", "1Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    // A pod of another VM on node-b uses the same claim: CPV(B) is refused…
    kv.fake.put_in(
        "pods",
        NS,
        fake_kube::launcher_pod("virt-launcher-vm-y-b", "vm-y", "claim-pv-force", "node-b"),
    );
    settle().await;
    let err = publish(&kv, &id, "node-b").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // …and CUV(B) still answers OK and leaves A alone.
    unpublish(&kv, &id, "node-b").await;
    assert_eq!(nodes(&state(&kv, "pv-force")), ["node-a"]);

    // A real migration; node-a dies and is force-detached after 6 minutes: CUV(A)
    // arrives with no NodeUnstage before it. OK, twice, and B is untouched.
    kv.fake.remove_in("pods", NS, "virt-launcher-vm-y-b");
    migrate(&kv, "mig-x", "vm-x", "pv-force", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    unpublish(&kv, &id, "node-a").await;
    unpublish(&kv, &id, "node-a").await;
    assert_eq!(nodes(&state(&kv, "pv-force")), ["node-b"]);
    publish(&kv, &id, "node-b").await.unwrap();
}

#[tokio::test]
async fn publish_to_the_target_racing_unpublish_of_the_source_ends_on_the_target() {
    let kv = start(true).await;
    for round in 0..6 {
        let pv = format!("pv-race-{round}");
        let vm = format!("vm-race-{round}");
        let id = disk(&kv, &pv).await;
        vm_on_a(&kv, &vm, &pv, "1Gi");
        publish(&kv, &id, "node-a").await.unwrap();
        migrate(&kv, &format!("mig-race-{round}"), &vm, &pv, "node-b");
        kv.fake
            .remove_in("pods", NS, &format!("virt-launcher-{vm}-a"));
        settle().await;
        // The attacher retries each call on Aborted (operation pending) until it is OK.
        let retry_publish = async {
            loop {
                match publish(&kv, &id, "node-b").await {
                    Ok(()) => break,
                    Err(e) if e.code() == Code::Aborted => {}
                    Err(e) => panic!("publish(B): {e}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let retry_unpublish = async {
            loop {
                match try_unpublish(&kv, &id, "node-a").await {
                    Ok(_) => break,
                    Err(e) if e.code() == Code::Aborted => {}
                    Err(e) => panic!("unpublish(A): {e}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::join!(retry_publish, retry_unpublish);
        let s = state(&kv, &pv);
        assert_eq!(nodes(&s), ["node-b"], "round {round}: {s}");
        assert!(
            s.get("migration_started_at").is_none(),
            "round {round}: {s}"
        );
    }
}

/// Moves the stored migration start back by `secs`, as if it had run that long.
fn age_migration(kv: &Kv, pv: &str, secs: i64) {
    let mut obj = kv.fake.get("persistentvolumes", pv).unwrap();
    let mut s = state(kv, pv);
    let started: chrono::DateTime<chrono::Utc> =
        s["migration_started_at"].as_str().unwrap().parse().unwrap();
    s["migration_started_at"] =
        serde_json::json!((started - chrono::Duration::seconds(secs)).to_rfc3339());
    obj["metadata"]["annotations"]["handoff.csi.dev/attachment"] = Value::String(s.to_string());
    kv.fake.put("persistentvolumes", obj);
}

/// `handoff-csi attachments --output json` against the fake cluster (async: the fake
/// API server runs on this test's runtime).
async fn attachments_json(kv: &Kv) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["attachments", "--store", "kube", "--output", "json"])
        .env("KUBECONFIG", &kv.kubeconfig)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn overdue_migration_warns_keeps_access_survives_restarts_and_completes_late() {
    let mut kv = start(true).await;
    let id = disk(&kv, "pv-late").await;
    vm_on_a(&kv, "vm-late", "pv-late", "1Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    let mut mig = migrate(&kv, "mig-late", "vm-late", "pv-late", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    let before = state(&kv, "pv-late");

    // Restart while the migration runs: order, start time, deadline and name survive.
    kv.driver.crash_and_restart().await;
    assert_eq!(state(&kv, "pv-late"), before);
    let m = metrics(&kv);
    assert_eq!(metric(&m, "handoff_csi_migrations_active"), Some(1.0));
    assert!(m.contains("migration=\"vms/mig-late\""), "{m}");

    // 1 GiB guest: 1200 s. Run it past the deadline; the reconciler reports it once.
    age_migration(&kv, "pv-late", 1300);
    let overdue = events(&kv, "MigrationOverdue", "VirtualMachineInstance").await;
    assert_eq!(overdue.len(), 1, "{overdue:?}");
    assert!(
        overdue[0].contains("vms/mig-late")
            && overdue[0].contains("node-a")
            && overdue[0].contains("node-b"),
        "{overdue:?}"
    );
    assert_eq!(state(&kv, "pv-late")["migration_overdue"], true);
    assert_eq!(
        metric(&metrics(&kv), "handoff_csi_migrations_overdue"),
        Some(1.0)
    );
    // Never detached, never refused for the nodes it has, not failed.
    for n in ["node-a", "node-b"] {
        publish(&kv, &id, n).await.unwrap();
    }
    assert_eq!(nodes(&state(&kv, "pv-late")), ["node-a", "node-b"]);
    let report = attachments_json(&kv).await;
    let vol = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == id.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(vol["migration"]["name"], "vms/mig-late");
    assert_eq!(vol["migration"]["overdue"], true);
    assert!(vol["migration"]["seconds_to_deadline"].as_i64().unwrap() < 0);

    // Restart while overdue: not reported again, the gauge is rebuilt.
    kv.driver.crash_and_restart().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        events(&kv, "MigrationOverdue", "VirtualMachineInstance")
            .await
            .len(),
        1
    );
    assert_eq!(
        metric(&metrics(&kv), "handoff_csi_migrations_overdue"),
        Some(1.0)
    );

    // It completes late after all.
    mig.complete();
    settle().await;
    unpublish(&kv, &id, "node-a").await;
    let done = events(&kv, "MigrationCompleted", "VirtualMachineInstance").await;
    assert!(done[0].contains("vms/mig-late"), "{done:?}");
    let m = metrics(&kv);
    assert_eq!(metric(&m, "handoff_csi_migrations_overdue"), Some(0.0));
    assert_eq!(
        metric(&m, "handoff_csi_migrations_total{result=\"completed\"}"),
        Some(1.0)
    );
    // And after a restart once it is over, one node and no migration remain.
    kv.driver.crash_and_restart().await;
    let s = state(&kv, "pv-late");
    assert_eq!(nodes(&s), ["node-b"]);
    assert!(s.get("migration").is_none());
}

#[tokio::test]
async fn pods_of_two_vms_on_one_claim_are_refused_with_a_stable_message() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-two").await;
    vm_on_a(&kv, "vm-one", "pv-two", "1Gi");
    kv.fake.put_in(
        "pods",
        NS,
        fake_kube::launcher_pod("virt-launcher-vm-two-b", "vm-two", "claim-pv-two", "node-b"),
    );
    publish(&kv, &id, "node-a").await.unwrap();
    settle().await;
    let first = publish(&kv, &id, "node-b").await.unwrap_err();
    let again = publish(&kv, &id, "node-b").await.unwrap_err();
    assert_eq!(first.code(), Code::FailedPrecondition);
    assert_eq!(first.message(), again.message(), "the attacher retries");
    assert!(
        first
            .message()
            .contains("vms/virt-launcher-vm-two-b on node-b (VM vm-two)")
            && first.message().contains("--allow-rwx-block-sharing"),
        "{}",
        first.message()
    );
    assert!(
        !first.message().contains("virt-launcher-vm-one-a"),
        "{}",
        first.message()
    );
    assert_eq!(nodes(&state(&kv, "pv-two")), ["node-a"]);
    assert_eq!(
        metric(
            &metrics(&kv),
            "handoff_csi_attach_conflicts_total{kind=\"shared_with_other_workloads\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_migration_object_that_arrives_late_is_matched_by_the_reconciler() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-match").await;
    vm_on_a(&kv, "vm-m", "pv-match", "16Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    let s = state(&kv, "pv-match");
    assert!(s.get("migration").is_none());
    // The VMI was known: its deadline already applies (16 GiB → 18 GB × 150 s + 900 s).
    assert_eq!(s["migration_timeout_secs"], 3600);
    // The target pod of a migration shows up only now (KubeVirt discovered late, say).
    let _mig = migrate(&kv, "mig-m", "vm-m", "pv-match", "node-b");
    let matched = events(&kv, "MigrationMatched", "VirtualMachineInstance").await;
    assert!(matched[0].contains("vms/mig-m"), "{matched:?}");
    let s2 = state(&kv, "pv-match");
    assert_eq!(s2["migration"]["name"], "mig-m");
    assert_eq!(
        s2["migration_started_at"], s["migration_started_at"],
        "the start time is kept"
    );
}

#[tokio::test]
async fn without_kubevirt_the_attach_rules_are_unchanged() {
    let kv = start(false).await;
    let id = disk(&kv, "pv-plain").await;
    // VMI objects without KubeVirt's API being served are not looked at.
    vm_on_a(&kv, "vm-p", "pv-plain", "16Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    kv.fake.put_in(
        "pods",
        NS,
        fake_kube::launcher_pod("virt-launcher-vm-p-b", "vm-p", "claim-pv-plain", "node-b"),
    );
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    let s = state(&kv, "pv-plain");
    assert_eq!(nodes(&s), ["node-a", "node-b"]);
    assert!(s.get("migration").is_none());
    assert_eq!(s["migration_timeout_secs"], 300, "StorageClass default");
    assert_eq!(s["deadline_basis"]["from"], "storage_class");
    assert_eq!(
        publish(&kv, &id, "node-c").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    unpublish(&kv, &id, "node-b").await;
    let aborted = events(&kv, "MigrationAborted", "PersistentVolume").await;
    assert!(aborted[0].contains("detach order"), "{aborted:?}");
    assert!(kv
        .fake
        .requests()
        .iter()
        .all(|(_, path, _)| !path.contains("/virtualmachineinstance")));
}

/// Polls the stored state until `check` holds (the reconciler runs every second).
async fn state_until(kv: &Kv, pv: &str, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let s = state(kv, pv);
        if check(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    state(kv, pv)
}

/// Issue 16 point 1: at the target's ControllerPublish nothing but the target pod names
/// the migration. A second attach from a node where the VM has no target pod is not
/// that migration, however new and unfinished the migration is.
#[tokio::test]
async fn the_dual_attach_is_tied_by_the_target_pod_not_by_the_newest_migration() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-pod").await;
    vm_on_a(&kv, "vm-pod", "pv-pod", "2Gi");
    publish(&kv, &id, "node-a").await.unwrap();
    // KubeVirt schedules the target pod to node-c…
    let mig = migrate(&kv, "mig-pod", "vm-pod", "pv-pod", "node-c");
    let vmim = kv
        .fake
        .get_in(VMIMS, NS, "mig-pod")
        .expect("migration object");
    assert_eq!(vmim["status"]["phase"], "Scheduling");
    assert!(
        vmim["status"]["migrationState"].is_null(),
        "no target node anywhere yet"
    );
    settle().await;
    // …but node-b asks (an operator's manual attach, say): not this migration.
    publish(&kv, &id, "node-b").await.unwrap();
    let s = state(&kv, "pv-pod");
    assert_eq!(nodes(&s), ["node-a", "node-b"]);
    assert!(
        s.get("migration").is_none(),
        "matched to a migration it is not: {s}"
    );
    unpublish(&kv, &id, "node-b").await;
    // The real target asks: matched through its pod's migrationJobUID.
    publish(&kv, &id, "node-c").await.unwrap();
    let s = state(&kv, "pv-pod");
    assert_eq!(s["migration"]["uid"], mig.uid.as_str());
    assert_eq!(s["migration"]["name"], "mig-pod");
    assert_eq!(s["migration"]["vmi"], "vm-pod");
}

/// Issue 16 point 2: KubeVirt publishes the migration's configuration at hand-off and
/// its start when memory moves, both after the attach. The deadline follows: a
/// MigrationPolicy's completionTimeoutPerGiB, post-copy's extra period, and the clock
/// starting at the run, not at the attach.
#[tokio::test]
async fn the_deadline_follows_kubevirts_clock_as_it_is_published() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-clock").await;
    vm_on_a(&kv, "vm-clock", "pv-clock", "4Gi");
    // The VMI still shows its previous migration's configuration: not this one's.
    let mut vmi = kv
        .fake
        .get_in("virtualmachineinstances", NS, "vm-clock")
        .unwrap();
    vmi["status"]["migrationState"] = serde_json::json!({"migrationUid": "old-uid",
        "completed": true, "migrationConfiguration": {"completionTimeoutPerGiB": 5}});
    kv.fake.put_in("virtualmachineinstances", NS, vmi);
    publish(&kv, &id, "node-a").await.unwrap();
    let mut mig = migrate(&kv, "mig-clock", "vm-clock", "pv-clock", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    let s = state(&kv, "pv-clock");
    // 4 GiB → 5 GB × 150 s default + 900 s pending allowance.
    assert_eq!(s["migration_timeout_secs"], 1650, "{s}");
    assert!(s["deadline_basis"].get("configured").is_none(), "{s}");
    let started: chrono::DateTime<chrono::Utc> =
        s["migration_started_at"].as_str().unwrap().parse().unwrap();

    // Hand-off with a MigrationPolicy: 60 s/GiB, post-copy allowed → 5 × 60 × 2.
    mig.hand_off(serde_json::json!({"completionTimeoutPerGiB": 60, "allowPostCopy": true}));
    let s = state_until(&kv, "pv-clock", |s| s["migration_timeout_secs"] == 1500).await;
    assert_eq!(s["migration_timeout_secs"], 1500, "{s}");
    assert_eq!(s["deadline_basis"]["configured"], true);
    assert_eq!(s["deadline_basis"]["switch"], "post-copy");

    // Memory starts moving 100 s after the attach: 100 + 600, no pending allowance.
    mig.run(started + chrono::Duration::seconds(100));
    let s = state_until(&kv, "pv-clock", |s| s["migration_timeout_secs"] == 700).await;
    assert_eq!(s["migration_timeout_secs"], 700, "{s}");
    assert!(s["deadline_basis"]["running_since"].is_string(), "{s}");
    assert_eq!(
        s["migration_started_at"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
        started,
        "the attach time is kept"
    );
    mig.succeed();
    settle().await;
    unpublish(&kv, &id, "node-a").await;
    assert_eq!(nodes(&state(&kv, "pv-clock")), ["node-b"]);
}

/// Issue 16 point 3: a claim used as `ephemeral.persistentVolumeClaim` is the VM's disk
/// too (its deadline is KubeVirt's), and the VM's name is the owner's, not the
/// deprecated label's (which holds the guest's host name).
#[tokio::test]
async fn ephemeral_claims_are_vm_disks_and_the_vm_is_named_by_its_owner() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-eph").await;
    let mut vmi = fake_kube::vmi("vm-eph", "unused", "node-a", "1Gi");
    vmi["spec"]["volumes"] = serde_json::json!([{"name": "disk",
        "ephemeral": {"persistentVolumeClaim": {"claimName": "claim-pv-eph", "readOnly": true}}}]);
    kv.fake.put_in("virtualmachineinstances", NS, vmi);
    kv.fake.put_in(
        "pods",
        NS,
        fake_kube::launcher_pod("virt-launcher-vm-eph-a", "vm-eph", "claim-pv-eph", "node-a"),
    );
    publish(&kv, &id, "node-a").await.unwrap();
    migrate(&kv, "mig-eph", "vm-eph", "pv-eph", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    let s = state(&kv, "pv-eph");
    assert_eq!(s["deadline_basis"]["from"], "kubevirt", "{s}");
    assert_eq!(s["deadline_basis"]["vmi"], "vm-eph");
    assert_eq!(s["migration"]["name"], "mig-eph");
}

/// Issue 16 point 4: Events carry involvedObject.uid (kubectl describe filters by it)
/// and a refusal listing many pods still fits the API server's 1,024-byte note.
#[tokio::test]
async fn events_have_uids_and_long_refusals_are_cut_to_fit() {
    let kv = start(true).await;
    let id = disk(&kv, "pv-ev").await;
    vm_on_a(&kv, "vm-ev", "pv-ev", "1Gi");
    for i in 0..40 {
        kv.fake.put_in(
            "pods",
            NS,
            fake_kube::launcher_pod(
                &format!("backup-job-with-a-rather-long-generated-name-{i:03}"),
                &format!("other-{i}"),
                "claim-pv-ev",
                "node-b",
            ),
        );
    }
    publish(&kv, &id, "node-a").await.unwrap();
    settle().await;
    let refused = publish(&kv, &id, "node-b").await.unwrap_err();
    assert!(
        refused.message().len() > 1024,
        "the refusal itself keeps every pod"
    );
    let pv_uid = kv.fake.get("persistentvolumes", "pv-ev").unwrap()["metadata"]["uid"].clone();
    let mut found = Vec::new();
    for _ in 0..100 {
        found = kv
            .fake
            .events()
            .into_iter()
            .filter(|e| e["reason"] == "AttachConflict")
            .collect();
        if found.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_pv = found
        .iter()
        .find(|e| e["involvedObject"]["kind"] == "PersistentVolume")
        .expect("the refusal is recorded on the PV despite its length");
    assert_eq!(on_pv["involvedObject"]["uid"], pv_uid);
    let note = on_pv["message"].as_str().unwrap();
    assert!(note.len() <= 1024 && note.contains("cut"), "{}", note.len());
    let on_pvc = found
        .iter()
        .find(|e| e["involvedObject"]["kind"] == "PersistentVolumeClaim")
        .expect("and on the claim");
    assert_eq!(on_pvc["involvedObject"]["uid"], "claim-uid-pv-ev");
    // A migration's Event on the VMI names its uid too.
    unpublish(&kv, &id, "node-b").await;
    for i in 0..40 {
        kv.fake.remove_in(
            "pods",
            NS,
            &format!("backup-job-with-a-rather-long-generated-name-{i:03}"),
        );
    }
    migrate(&kv, "mig-ev", "vm-ev", "pv-ev", "node-b");
    settle().await;
    publish(&kv, &id, "node-b").await.unwrap();
    let mut vmi_uid = Value::Null;
    for _ in 0..100 {
        if let Some(e) = kv.fake.events().into_iter().find(|e| {
            e["reason"] == "MigrationStarted"
                && e["involvedObject"]["kind"] == "VirtualMachineInstance"
        }) {
            vmi_uid = e["involvedObject"]["uid"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(vmi_uid, "vmi-uid-vm-ev");
}
