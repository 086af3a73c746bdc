//! What the AttachmentManager reports: every decision worth a metric, a log line or a
//! Kubernetes Event goes through one `EventSink`, so observers never re-derive it.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use chrono::{DateTime, Utc};

use super::state::{MigrationOutcome, MigrationRef};
use crate::ids::{NodeId, VolumeId};

/// A migration in progress, as observers (metrics) need it after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveMigration {
    pub volume: VolumeId,
    pub source: NodeId,
    pub target: NodeId,
    pub migration: Option<MigrationRef>,
    pub deadline: Option<DateTime<Utc>>,
    pub overdue: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    Attached {
        volume: VolumeId,
        node: NodeId,
    },
    Detached {
        volume: VolumeId,
        node: NodeId,
    },
    /// A publish was refused because other nodes hold the volume.
    AttachConflict {
        volume: VolumeId,
        requester: NodeId,
        holders: Vec<NodeId>,
        /// Short label for metrics: rwo_held, migration_limit, migration_timed_out.
        kind: &'static str,
        message: String,
    },
    /// RWO moved to a new node within the grace period after its holder detached.
    HandedOff {
        volume: VolumeId,
        from: NodeId,
        to: NodeId,
    },
    /// The RWO holder's Node object is gone; its attachment was cleared for a new node.
    StaleHolderCleared {
        volume: VolumeId,
        holder: NodeId,
        to: NodeId,
    },
    MigrationStarted(ActiveMigration),
    /// A running dual attach was tied to its KubeVirt migration after it started (the
    /// migration object arrived late); the deadline may have changed with it.
    MigrationMatched(ActiveMigration),
    /// One side left; `remaining` is the sole primary now.
    MigrationEnded {
        volume: VolumeId,
        source: NodeId,
        target: NodeId,
        remaining: NodeId,
        outcome: MigrationOutcome,
        /// What the outcome rests on: the migration's phase, or detach order.
        basis: String,
        migration: Option<MigrationRef>,
        duration: Option<Duration>,
        was_overdue: bool,
    },
    /// The migration passed its deadline. Reported once; access is not revoked and the
    /// migration is not failed for it.
    MigrationOverdue {
        volume: VolumeId,
        source: NodeId,
        target: NodeId,
        migration: Option<MigrationRef>,
        timeout_secs: u64,
    },
    /// The stored state disagreed with the cluster's VolumeAttachments and was repaired.
    StateRepaired {
        volume: VolumeId,
        added: Vec<NodeId>,
        removed: Vec<NodeId>,
    },
    /// The cluster shows a volume on more nodes than its mode allows (found at rebuild):
    /// new publishes are refused until all but the allowed are detached.
    ClusterConflict {
        volume: VolumeId,
        nodes: Vec<NodeId>,
    },
    /// The volume's record cannot be decided on (unreadable, duplicate PVs): its publish
    /// or unpublish was refused with what to repair.
    Quarantined {
        volume: VolumeId,
        reason: String,
    },
    /// A node that lost its attachment was cut off at the target (`connections`
    /// dropped); `ok` is false when the fence did not complete (the unpublish fails).
    Fenced {
        volume: VolumeId,
        node: NodeId,
        connections: Option<usize>,
        ok: bool,
    },
    /// State was rebuilt at start-up.
    Restored {
        volumes: usize,
        migrations: Vec<ActiveMigration>,
    },
}

impl AttachEvent {
    /// The KubeVirt migration the event is about, if known.
    pub fn migration(&self) -> Option<&MigrationRef> {
        match self {
            AttachEvent::MigrationStarted(m) | AttachEvent::MigrationMatched(m) => {
                m.migration.as_ref()
            }
            AttachEvent::MigrationEnded { migration, .. }
            | AttachEvent::MigrationOverdue { migration, .. } => migration.as_ref(),
            _ => None,
        }
    }

    pub fn volume(&self) -> Option<&VolumeId> {
        match self {
            AttachEvent::Attached { volume, .. }
            | AttachEvent::Detached { volume, .. }
            | AttachEvent::AttachConflict { volume, .. }
            | AttachEvent::HandedOff { volume, .. }
            | AttachEvent::StaleHolderCleared { volume, .. }
            | AttachEvent::MigrationEnded { volume, .. }
            | AttachEvent::MigrationOverdue { volume, .. }
            | AttachEvent::StateRepaired { volume, .. }
            | AttachEvent::ClusterConflict { volume, .. }
            | AttachEvent::Quarantined { volume, .. }
            | AttachEvent::Fenced { volume, .. } => Some(volume),
            AttachEvent::MigrationStarted(m) | AttachEvent::MigrationMatched(m) => Some(&m.volume),
            AttachEvent::Restored { .. } => None,
        }
    }
}

/// "namespace/name" of a migration, or "unknown" when the cluster did not say.
pub fn migration_name(m: &Option<MigrationRef>) -> String {
    m.as_ref()
        .map_or_else(|| "unknown".into(), |m| m.to_string())
}

pub trait EventSink: Send + Sync + 'static {
    fn emit(&self, event: &AttachEvent);
}

/// Structured log lines for every event (the embedded default's only "event" channel).
#[derive(Debug, Default, Clone)]
pub struct LogSink;

impl EventSink for LogSink {
    fn emit(&self, event: &AttachEvent) {
        match event {
            AttachEvent::Attached { volume, node } => {
                info!(volume_id = %volume, node_id = %node, "volume attached")
            }
            AttachEvent::Detached { volume, node } => {
                info!(volume_id = %volume, node_id = %node, "volume detached")
            }
            AttachEvent::AttachConflict {
                volume,
                requester,
                message,
                ..
            } => {
                warn!(volume_id = %volume, node_id = %requester, message, "attach refused")
            }
            AttachEvent::HandedOff { volume, from, to } => {
                info!(volume_id = %volume, from = %from, to = %to, "RWO volume handed off within grace period")
            }
            AttachEvent::StaleHolderCleared { volume, holder, to } => {
                warn!(volume_id = %volume, holder = %holder, to = %to, "holder node is gone: attachment cleared")
            }
            AttachEvent::MigrationStarted(m) => {
                info!(volume_id = %m.volume, source = %m.source, target = %m.target, migration = migration_name(&m.migration), deadline = ?m.deadline, "live migration started")
            }
            AttachEvent::MigrationMatched(m) => {
                info!(volume_id = %m.volume, source = %m.source, target = %m.target, migration = migration_name(&m.migration), deadline = ?m.deadline, "live migration matched to its KubeVirt migration")
            }
            AttachEvent::MigrationEnded {
                volume,
                source,
                target,
                remaining,
                outcome,
                basis,
                migration,
                duration,
                ..
            } => {
                let outcome = outcome.as_str();
                if outcome == "completed" {
                    info!(volume_id = %volume, source = %source, target = %target, remaining = %remaining, outcome, basis, migration = migration_name(migration), duration = ?duration, "live migration ended")
                } else {
                    warn!(volume_id = %volume, source = %source, target = %target, remaining = %remaining, outcome, basis, migration = migration_name(migration), duration = ?duration, "live migration ended")
                }
            }
            AttachEvent::MigrationOverdue {
                volume,
                source,
                target,
                migration,
                timeout_secs,
            } => {
                warn!(volume_id = %volume, source = %source, target = %target, migration = migration_name(migration), timeout_secs, "live migration passed its deadline; both nodes keep access")
            }
            AttachEvent::StateRepaired {
                volume,
                added,
                removed,
            } => {
                warn!(volume_id = %volume, added = ?added, removed = ?removed, "attachment state repaired from VolumeAttachments")
            }
            AttachEvent::Quarantined { volume, reason } => {
                error!(volume_id = %volume, reason, "volume quarantined: publish/unpublish refused")
            }
            AttachEvent::ClusterConflict { volume, nodes } => {
                error!(volume_id = %volume, nodes = ?nodes, "the cluster shows the volume on more nodes than its access mode allows; new publishes are refused until it is resolved")
            }
            AttachEvent::Fenced {
                volume,
                node,
                connections,
                ok,
            } => {
                let connections = connections.map_or("unknown".to_owned(), |n| n.to_string());
                if *ok {
                    info!(volume_id = %volume, node_id = %node, connections = %connections, "node fenced at the target")
                } else {
                    warn!(volume_id = %volume, node_id = %node, "fencing the node at the target did not complete")
                }
            }
            AttachEvent::Restored {
                volumes,
                migrations,
            } => {
                info!(
                    volumes,
                    migrations_active = migrations.len(),
                    "attachment state rebuilt"
                )
            }
        }
    }
}

/// Sends every event to several sinks (metrics, logs, Kubernetes Events).
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn emit(&self, event: &AttachEvent) {
        for sink in &self.0 {
            sink.emit(event);
        }
    }
}

/// Keeps events in memory, for tests.
#[derive(Debug, Default)]
pub struct RecordingSink(pub parking_lot::Mutex<Vec<AttachEvent>>);

impl EventSink for RecordingSink {
    fn emit(&self, event: &AttachEvent) {
        self.0.lock().push(event.clone());
    }
}

impl RecordingSink {
    pub fn take(&self) -> Vec<AttachEvent> {
        std::mem::take(&mut *self.0.lock())
    }
}
