//! What the AttachmentManager reports: every decision worth a metric, a log line or a
//! Kubernetes Event goes through one `EventSink`, so observers never re-derive it.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::ids::{NodeId, VolumeId};

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
    MigrationStarted {
        volume: VolumeId,
        source: NodeId,
        target: NodeId,
    },
    MigrationCompleted {
        volume: VolumeId,
        source: NodeId,
        target: NodeId,
        duration: Option<Duration>,
    },
    MigrationAborted {
        volume: VolumeId,
        source: NodeId,
        target: NodeId,
        duration: Option<Duration>,
    },
    /// The migration passed its deadline. Reported once; access is not revoked.
    MigrationTimedOut {
        volume: VolumeId,
        source: NodeId,
        target: NodeId,
        timeout_secs: u64,
    },
    /// The stored state disagreed with the cluster's VolumeAttachments and was repaired.
    StateRepaired {
        volume: VolumeId,
        added: Vec<NodeId>,
        removed: Vec<NodeId>,
    },
    /// State was rebuilt at start-up.
    Restored {
        volumes: usize,
        migrations_active: usize,
    },
}

impl AttachEvent {
    pub fn volume(&self) -> Option<&VolumeId> {
        match self {
            AttachEvent::Attached { volume, .. }
            | AttachEvent::Detached { volume, .. }
            | AttachEvent::AttachConflict { volume, .. }
            | AttachEvent::HandedOff { volume, .. }
            | AttachEvent::StaleHolderCleared { volume, .. }
            | AttachEvent::MigrationStarted { volume, .. }
            | AttachEvent::MigrationCompleted { volume, .. }
            | AttachEvent::MigrationAborted { volume, .. }
            | AttachEvent::MigrationTimedOut { volume, .. }
            | AttachEvent::StateRepaired { volume, .. } => Some(volume),
            AttachEvent::Restored { .. } => None,
        }
    }
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
            AttachEvent::MigrationStarted {
                volume,
                source,
                target,
            } => {
                info!(volume_id = %volume, source = %source, target = %target, "live migration started")
            }
            AttachEvent::MigrationCompleted {
                volume,
                source,
                target,
                duration,
            } => {
                info!(volume_id = %volume, source = %source, target = %target, duration = ?duration, "live migration completed")
            }
            AttachEvent::MigrationAborted {
                volume,
                source,
                target,
                duration,
            } => {
                warn!(volume_id = %volume, source = %source, target = %target, duration = ?duration, "live migration aborted")
            }
            AttachEvent::MigrationTimedOut {
                volume,
                source,
                target,
                timeout_secs,
            } => {
                warn!(volume_id = %volume, source = %source, target = %target, timeout_secs, "live migration passed its timeout; both nodes keep access")
            }
            AttachEvent::StateRepaired {
                volume,
                added,
                removed,
            } => {
                warn!(volume_id = %volume, added = ?added, removed = ?removed, "attachment state repaired from VolumeAttachments")
            }
            AttachEvent::Restored {
                volumes,
                migrations_active,
            } => {
                info!(volumes, migrations_active, "attachment state rebuilt")
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
