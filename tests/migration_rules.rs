//! Live-migration attach rules across processes, controller side only (no root needed):
//! the CSI call sequence of external-attacher during a KubeVirt migration and its
//! failure paths, checked against the persisted state and the metrics endpoint.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use support::*;
use tonic::Code;

fn rwx() -> csi::VolumeCapability {
    block_cap(Mode::MultiNodeMultiWriter)
}

async fn vm_disk(d: &Driver, name: &str, params: &[(&str, &str)]) -> String {
    let mut req = create_request(name, MIB, rwx());
    req.parameters = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<HashMap<_, _>>();
    d.controller()
        .await
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn unpublish(d: &Driver, id: &str, node: &str) {
    d.controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn stored(d: &Driver, id: &str) -> Option<serde_json::Value> {
    let bytes = std::fs::read(d.state_dir().join("attachments").join(format!("{id}.json"))).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn aborted_migration_keeps_the_source_primary() {
    let d = Driver::start().await;
    let id = vm_disk(&d, "vm-abort", &[]).await;
    let mut c = d.controller().await;
    for n in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    unpublish(&d, &id, "node-b").await;
    let state = stored(&d, &id).unwrap();
    assert_eq!(stored_nodes(&state), ["node-a"]);
    assert!(state.get("migration_started_at").is_none());
    // A new target may come; node-a is still the source.
    c.controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap();
    assert_eq!(
        stored_nodes(&stored(&d, &id).unwrap()),
        ["node-a", "node-c"]
    );
}

#[tokio::test]
async fn third_node_during_a_migration_is_refused() {
    let d = Driver::start().await;
    let id = vm_disk(&d, "vm-third", &[]).await;
    let mut c = d.controller().await;
    for n in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    let status = c
        .controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("already attached to node-a and node-b"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn controller_killed_mid_migration_restores_order_and_start_time() {
    let mut d = Driver::start().await;
    let id = vm_disk(&d, "vm-kill", &[]).await;
    {
        let mut c = d.controller().await;
        for n in ["node-b", "node-a"] {
            c.controller_publish_volume(publish_request(&id, n, rwx()))
                .await
                .unwrap();
        }
    }
    let before = stored(&d, &id).unwrap();
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .arg("attachments")
        .arg("--state-dir")
        .arg(d.state_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains(" RWX ")),
        "{table}"
    );
    assert!(table.contains("node-b → node-a"), "{table}");
    assert!(
        table.contains("in 4m59s") || table.contains("in 5m00s"),
        "{table}"
    );
    d.crash_and_restart().await;
    let mut c = d.controller().await;
    for n in ["node-b", "node-a"] {
        c.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    assert_eq!(
        stored(&d, &id).unwrap(),
        before,
        "nothing rewritten by the restart"
    );
    assert_eq!(stored_nodes(&before), ["node-b", "node-a"]);
    assert_eq!(
        code(
            c.controller_publish_volume(publish_request(&id, "node-c", rwx()))
                .await
        ),
        Code::FailedPrecondition
    );
    // Completing the migration after the restart promotes the target.
    unpublish(&d, &id, "node-b").await;
    assert_eq!(stored_nodes(&stored(&d, &id).unwrap()), ["node-a"]);
}

#[tokio::test]
async fn migration_timeout_refuses_new_nodes_until_one_side_detaches() {
    let port = free_port();
    let d = Driver::start_with(DriverOptions {
        extra_args: vec![
            "--reconcile-interval".into(),
            "1s".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
        ],
        ..Default::default()
    })
    .await;
    let id = vm_disk(&d, "vm-timeout", &[("migrationTimeoutSeconds", "30")]).await;
    let mut c = d.controller().await;
    for n in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(32)).await;
    let status = c
        .controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("30s deadline"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("detached"),
        "{}",
        status.message()
    );
    // Access is never revoked: both holders still get OK.
    for n in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    let (_, metrics) = http_get(port, "/metrics");
    assert!(
        metrics.contains("handoff_csi_migrations_total{result=\"overdue\"} 1"),
        "{metrics}"
    );
    assert_eq!(stored(&d, &id).unwrap()["migration_overdue"], true);
    // Recovery: the failed target detaches; a new migration may start.
    unpublish(&d, &id, "node-b").await;
    c.controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .unwrap();
}

#[tokio::test]
async fn metrics_endpoint_reports_attach_decisions() {
    let port = free_port();
    let d = Driver::start_with(DriverOptions {
        extra_args: vec!["--metrics-addr".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    })
    .await;
    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/readyz").0, 200);

    let id = vm_disk(&d, "vm-metrics", &[]).await;
    let mut c = d.controller().await;
    for n in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, n, rwx()))
            .await
            .unwrap();
    }
    let (_, during) = http_get(port, "/metrics");
    assert!(
        during.contains("handoff_csi_migrations_active 1"),
        "{during}"
    );
    assert!(c
        .controller_publish_volume(publish_request(&id, "node-c", rwx()))
        .await
        .is_err());
    unpublish(&d, &id, "node-a").await;

    // An RWO hand-off within the grace period and an RWO conflict.
    let rwo = d
        .controller()
        .await
        .create_volume(create_request("rwo-metrics", MIB, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    c.controller_publish_volume(publish_request(&rwo, "node-a", rwo_block()))
        .await
        .unwrap();
    assert!(c
        .controller_publish_volume(publish_request(&rwo, "node-b", rwo_block()))
        .await
        .is_err());
    unpublish(&d, &rwo, "node-a").await;
    c.controller_publish_volume(publish_request(&rwo, "node-b", rwo_block()))
        .await
        .unwrap();

    let (code, m) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    for expected in [
        "handoff_csi_migrations_active 0",
        "handoff_csi_migrations_total{result=\"started\"} 1",
        "handoff_csi_migrations_total{result=\"completed\"} 1",
        "handoff_csi_migration_duration_seconds_count{result=\"completed\"} 1",
        "handoff_csi_attach_conflicts_total{kind=\"migration_limit\"} 1",
        "handoff_csi_attach_conflicts_total{kind=\"rwo_held\"} 1",
        "handoff_csi_grace_period_handoffs_total 1",
        "handoff_csi_rpc_total{code=\"Ok\",method=\"ControllerPublishVolume\"} 4",
        "handoff_csi_rpc_total{code=\"FailedPrecondition\",method=\"ControllerPublishVolume\"} 2",
        "handoff_csi_rpc_duration_seconds_count{method=\"CreateVolume\"} 2",
    ] {
        assert!(m.contains(expected), "missing {expected}:\n{m}");
    }
}
