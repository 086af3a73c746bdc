//! Prometheus metrics (an instance, not a global registry, so tests run in parallel)
//! and the HTTP endpoint serving /metrics, /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::attachment::events::{migration_name, ActiveMigration, AttachEvent, EventSink};
use crate::ids::VolumeId;

/// A running migration's deadline series labels, and whether it is counted overdue.
type Tracked = (Vec<String>, bool);

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    rpc_total: IntCounterVec,
    rpc_seconds: HistogramVec,
    attach_operations: IntCounterVec,
    attach_conflicts: IntCounterVec,
    handoffs: IntCounter,
    stale_holders_cleared: IntCounter,
    migrations_active: IntGauge,
    state_repairs: IntCounter,
    migrations: IntCounterVec,
    migration_seconds: HistogramVec,
    migrations_overdue: IntGauge,
    migration_deadline: GaugeVec,
    fences: IntCounterVec,
    /// Per running migration: its deadline series' labels and whether it is overdue,
    /// so the series goes when the migration ends.
    running: Arc<Mutex<HashMap<VolumeId, Tracked>>>,
    ready: Arc<AtomicBool>,
    build_info: IntGaugeVec,
    ready_gauge: IntGaugeVec,
    leader: IntGaugeVec,
    attached_volumes: IntGaugeVec,
    /// This process's `mode` and `node` labels, once `identify` named them.
    me: Arc<Mutex<Option<[String; 2]>>>,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("handoff_csi".into()), None)
            .expect("static registry prefix is valid");
        let r = &registry;
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("static metric"),
            )
        };
        let rpc_total = counter_vec(
            "rpc_total",
            "CSI RPCs handled, by method and gRPC code",
            &["method", "code"],
        );
        let rpc_seconds = register(
            r,
            HistogramVec::new(
                HistogramOpts::new("rpc_duration_seconds", "CSI RPC latency by method").buckets(
                    vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ],
                ),
                &["method"],
            )
            .expect("static metric"),
        );
        let attach_operations = counter_vec(
            "attach_operations_total",
            "Attachment changes that were persisted, by operation (attach|detach)",
            &["operation"],
        );
        let attach_conflicts = counter_vec(
            "attach_conflicts_total",
            "Publishes refused because other nodes hold the volume, by kind (rwo_held|migration_limit|migration_timed_out)",
            &["kind"],
        );
        let handoffs = register(
            r,
            IntCounter::new(
                "grace_period_handoffs_total",
                "RWO volumes handed to a new node within the grace period after a detach",
            )
            .expect("static metric"),
        );
        let stale_holders_cleared = register(
            r,
            IntCounter::new(
                "stale_holders_cleared_total",
                "RWO attachments cleared because the holder's Node object is gone",
            )
            .expect("static metric"),
        );
        let migrations_active = register(
            r,
            IntGauge::new(
                "migrations_active",
                "Volumes attached to two nodes for a live migration right now",
            )
            .expect("static metric"),
        );
        let state_repairs = register(
            r,
            IntCounter::new(
                "state_repairs_total",
                "Stored attachment states corrected from VolumeAttachments",
            )
            .expect("static metric"),
        );
        let migrations = counter_vec(
            "migrations_total",
            "Live migrations by result (started|completed|aborted|failed|overdue)",
            &["result"],
        );
        let fences = counter_vec(
            "fences_total",
            "Nodes cut off at the NBD target after losing an attachment, by result (ok|failed)",
            &["result"],
        );
        let migrations_overdue = register(
            r,
            IntGauge::new(
                "migrations_overdue",
                "Running live migrations past their deadline (access is kept)",
            )
            .expect("static metric"),
        );
        let migration_deadline = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "migration_deadline_timestamp_seconds",
                    "Deadline of each running live migration (Unix time), named by volume, KubeVirt migration (namespace/name or unknown) and nodes",
                ),
                &["volume", "migration", "source", "target"],
            )
            .expect("static metric"),
        );
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric"),
            )
        };
        let build_info = gauge_vec(
            "build_info",
            "1 for each running handoff-csi process: its version, mode (controller|node|all) and node id",
            &["version", "mode", "node"],
        );
        let ready_gauge = gauge_vec(
            "ready",
            "1 once the process serves CSI (what /readyz answers), by mode and node",
            &["mode", "node"],
        );
        let leader = gauge_vec(
            "leader",
            "1 while this controller replica may run the reconciler (holds the background lease), by mode and node",
            &["mode", "node"],
        );
        let attached_volumes = gauge_vec(
            "attached_volumes",
            "Volumes the controller's attachment state has published to each node",
            &["node"],
        );
        let migration_seconds = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "migration_duration_seconds",
                    "Time from second attach to first detach, by result",
                )
                .buckets(vec![
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
                ]),
                &["result"],
            )
            .expect("static metric"),
        );
        Metrics {
            registry,
            rpc_total,
            rpc_seconds,
            attach_operations,
            attach_conflicts,
            handoffs,
            stale_holders_cleared,
            migrations_active,
            state_repairs,
            migrations,
            migration_seconds,
            migrations_overdue,
            migration_deadline,
            fences,
            running: Arc::new(Mutex::new(HashMap::new())),
            ready: Arc::new(AtomicBool::new(false)),
            build_info,
            ready_gauge,
            leader,
            attached_volumes,
            me: Arc::new(Mutex::new(None)),
        }
    }

    /// Names this process in the `build_info`, `ready` and `leader` series.
    pub fn identify(&self, mode: &str, node: &str) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), mode, node])
            .set(1);
        *self.me.lock() = Some([mode.to_owned(), node.to_owned()]);
        let ready = self.ready.load(Ordering::SeqCst);
        self.set_process_gauge(&self.ready_gauge, ready);
        self.set_process_gauge(&self.leader, false);
    }

    fn set_process_gauge(&self, gauge: &IntGaugeVec, on: bool) {
        if let Some([mode, node]) = self.me.lock().as_ref() {
            gauge.with_label_values(&[mode, node]).set(i64::from(on));
        }
    }

    /// Whether this replica runs the background work now.
    pub fn set_leader(&self, leader: bool) {
        self.set_process_gauge(&self.leader, leader);
    }

    /// The published volumes per node, from the attachment state (replaces the last).
    pub fn set_attached_volumes(&self, per_node: &std::collections::BTreeMap<String, i64>) {
        self.attached_volumes.reset();
        for (node, n) in per_node {
            self.attached_volumes.with_label_values(&[node]).set(*n);
        }
    }

    pub fn observe_rpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.rpc_total
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
        self.rpc_seconds
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }

    pub fn rpc_count(&self, method: &str, code: tonic::Code) -> u64 {
        self.rpc_total
            .with_label_values(&[method, &format!("{code:?}")])
            .get()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.set_process_gauge(&self.ready_gauge, ready);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text format is UTF-8")
    }
}

impl Metrics {
    /// Starts (or relabels) the deadline series of a running migration.
    fn track(&self, m: &ActiveMigration) {
        self.untrack(&m.volume);
        let labels = vec![
            m.volume.to_string(),
            migration_name(&m.migration),
            m.source.to_string(),
            m.target.to_string(),
        ];
        if let Some(d) = m.deadline {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.migration_deadline
                .with_label_values(&refs)
                .set(d.timestamp() as f64);
        }
        if m.overdue {
            self.migrations_overdue.inc();
        }
        self.migrations_active.inc();
        self.running
            .lock()
            .insert(m.volume.clone(), (labels, m.overdue));
    }

    fn untrack(&self, volume: &VolumeId) {
        let Some((labels, overdue)) = self.running.lock().remove(volume) else {
            return;
        };
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = self.migration_deadline.remove_label_values(&refs);
        if overdue {
            self.migrations_overdue.dec();
        }
        self.migrations_active.dec();
    }
}

impl EventSink for Metrics {
    fn emit(&self, event: &AttachEvent) {
        match event {
            AttachEvent::Attached { .. } => {
                self.attach_operations.with_label_values(&["attach"]).inc()
            }
            AttachEvent::Detached { .. } => {
                self.attach_operations.with_label_values(&["detach"]).inc()
            }
            AttachEvent::AttachConflict { kind, .. } => {
                self.attach_conflicts.with_label_values(&[kind]).inc()
            }
            AttachEvent::HandedOff { .. } => self.handoffs.inc(),
            AttachEvent::StaleHolderCleared { .. } => self.stale_holders_cleared.inc(),
            AttachEvent::MigrationStarted(m) => {
                self.migrations.with_label_values(&["started"]).inc();
                self.track(m);
            }
            AttachEvent::MigrationMatched(m) => self.track(m),
            AttachEvent::MigrationEnded {
                volume,
                outcome,
                duration,
                ..
            } => {
                let result = outcome.as_str();
                self.migrations.with_label_values(&[result]).inc();
                if let Some(d) = duration {
                    self.migration_seconds
                        .with_label_values(&[result])
                        .observe(d.as_secs_f64());
                }
                self.untrack(volume);
            }
            AttachEvent::MigrationOverdue { volume, .. } => {
                self.migrations.with_label_values(&["overdue"]).inc();
                if let Some((_, overdue)) = self.running.lock().get_mut(volume) {
                    if !*overdue {
                        *overdue = true;
                        self.migrations_overdue.inc();
                    }
                }
            }
            AttachEvent::StateRepaired { .. } => self.state_repairs.inc(),
            AttachEvent::Quarantined { .. } => self
                .attach_conflicts
                .with_label_values(&["quarantined"])
                .inc(),
            AttachEvent::ClusterConflict { .. } => self
                .attach_conflicts
                .with_label_values(&["cluster_conflict"])
                .inc(),
            AttachEvent::Fenced { ok, .. } => self
                .fences
                .with_label_values(&[if *ok { "ok" } else { "failed" }])
                .inc(),
            AttachEvent::Restored { migrations, .. } => {
                let volumes: Vec<VolumeId> = self.running.lock().keys().cloned().collect();
                for v in volumes {
                    self.untrack(&v);
                }
                for m in migrations {
                    self.track(m);
                }
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

async fn metrics(State(m): State<Metrics>) -> String {
    m.render()
}

async fn readyz(State(m): State<Metrics>) -> (StatusCode, &'static str) {
    if m.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

pub fn router(m: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(m)
}

/// Serves the metrics endpoint until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    m: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, router(m))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_events_drive_migration_metrics() {
        use crate::attachment::state::{MigrationOutcome, MigrationRef};
        use crate::ids::{NodeId, VolumeId};
        let m = Metrics::new();
        let (volume, a, b) = (
            VolumeId::generate(),
            NodeId::parse("a").unwrap(),
            NodeId::parse("b").unwrap(),
        );
        let deadline = chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap();
        let mut active = ActiveMigration {
            volume: volume.clone(),
            source: a.clone(),
            target: b.clone(),
            migration: None,
            deadline: Some(deadline),
            overdue: false,
        };
        m.emit(&AttachEvent::MigrationStarted(active.clone()));
        let text = m.render();
        assert!(text.contains("handoff_csi_migrations_active 1"), "{text}");
        assert!(
            text.contains(&format!("handoff_csi_migration_deadline_timestamp_seconds{{migration=\"unknown\",source=\"a\",target=\"b\",volume=\"{volume}\"}} 1900000000")),
            "{text}"
        );
        // Matched late to its KubeVirt migration: the series is relabelled, not doubled.
        active.migration = Some(MigrationRef {
            namespace: "vms".into(),
            name: "mig-1".into(),
            uid: "u".into(),
            vmi: "vm1".into(),
        });
        m.emit(&AttachEvent::MigrationMatched(active.clone()));
        let text = m.render();
        assert!(text.contains("migration=\"vms/mig-1\""), "{text}");
        assert!(!text.contains("migration=\"unknown\""), "{text}");
        assert!(text.contains("handoff_csi_migrations_active 1"), "{text}");
        m.emit(&AttachEvent::AttachConflict {
            volume: volume.clone(),
            requester: NodeId::parse("c").unwrap(),
            holders: vec![a.clone(), b.clone()],
            kind: "migration_limit",
            message: String::new(),
        });
        m.emit(&AttachEvent::MigrationOverdue {
            volume: volume.clone(),
            source: a.clone(),
            target: b.clone(),
            migration: active.migration.clone(),
            timeout_secs: 30,
        });
        assert!(m.render().contains("handoff_csi_migrations_overdue 1"));
        m.emit(&AttachEvent::MigrationEnded {
            volume: volume.clone(),
            source: a.clone(),
            target: b.clone(),
            remaining: b.clone(),
            outcome: MigrationOutcome::Completed,
            basis: "detach order".into(),
            migration: active.migration.clone(),
            duration: Some(Duration::from_secs(12)),
            was_overdue: true,
        });
        let text = m.render();
        assert!(text.contains("handoff_csi_migrations_active 0"), "{text}");
        assert!(text.contains("handoff_csi_migrations_overdue 0"), "{text}");
        assert!(
            !text.contains("handoff_csi_migration_deadline_timestamp_seconds{"),
            "{text}"
        );
        assert!(
            text.contains("handoff_csi_migrations_total{result=\"completed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("handoff_csi_migrations_total{result=\"overdue\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("handoff_csi_attach_conflicts_total{kind=\"migration_limit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("handoff_csi_migration_duration_seconds_sum{result=\"completed\"} 12"),
            "{text}"
        );
        active.overdue = true;
        m.emit(&AttachEvent::Restored {
            volumes: 5,
            migrations: vec![
                active.clone(),
                ActiveMigration {
                    volume: VolumeId::generate(),
                    overdue: false,
                    ..active
                },
            ],
        });
        let text = m.render();
        assert!(text.contains("handoff_csi_migrations_active 2"), "{text}");
        assert!(text.contains("handoff_csi_migrations_overdue 1"), "{text}");
    }

    #[test]
    fn rpc_metrics_are_rendered() {
        let m = Metrics::new();
        m.observe_rpc("CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        m.observe_rpc("CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        assert_eq!(m.rpc_count("CreateVolume", tonic::Code::Ok), 2);
        let text = m.render();
        assert!(
            text.contains("handoff_csi_rpc_total{code=\"Ok\",method=\"CreateVolume\"} 2"),
            "{text}"
        );
        assert!(text.contains("handoff_csi_rpc_duration_seconds_bucket"));
    }
}
