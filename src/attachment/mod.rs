//! The AttachmentManager: which nodes may hold a volume, decided under a per-volume
//! lock, persisted before the caller is told, and rebuilt from the store at start-up.

pub mod cluster;
pub mod events;
pub mod rebuild;
pub mod report;
pub mod state;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;

use self::cluster::{ClusterError, ClusterView};
use self::events::{AttachEvent, EventSink};
use self::state::{
    decide_publish, decide_unpublish, AttachmentState, PublishContext, PublishDecision,
    PublishRefusal, PublishRequest, UnpublishDecision,
};
use self::store::{AttachmentStore, StoreError};
use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};
use crate::locks::{Busy, OperationGuard, OperationLocks};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Refused(#[from] PublishRefusal),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("attachment state could not be persisted, nothing was changed: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("node {0} does not exist in the cluster")]
    UnknownNode(NodeId),
}

/// What a successful publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    AlreadyAttached,
    Attached,
    HandedOff,
    StaleHolderCleared,
    MigrationStarted,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How long a detached RWO holder is remembered (0 disables).
    pub grace_period: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            grace_period: Duration::from_secs(30),
        }
    }
}

pub struct AttachmentManager {
    store: Arc<dyn AttachmentStore>,
    cluster: Arc<dyn ClusterView>,
    events: Arc<dyn EventSink>,
    policy: Policy,
    locks: OperationLocks,
    states: DashMap<VolumeId, AttachmentState>,
}

fn elapsed_since(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Duration> {
    t.and_then(|t| (now - t).to_std().ok())
}

impl AttachmentManager {
    /// Rebuilds the in-memory state from the store, cross-checked with the cluster;
    /// call before serving Controller RPCs.
    pub async fn load(
        store: Arc<dyn AttachmentStore>,
        cluster: Arc<dyn ClusterView>,
        events: Arc<dyn EventSink>,
        policy: Policy,
    ) -> Result<Self, AttachError> {
        let loaded = store.load_all().await?;
        let states =
            rebuild::cross_check(loaded, cluster.as_ref(), store.as_ref(), events.as_ref()).await?;
        let migrations_active = states
            .iter()
            .filter(|s| s.nodes.len() == 2 && s.sharing == Sharing::Rwx)
            .count();
        events.emit(&AttachEvent::Restored {
            volumes: states.len(),
            migrations_active,
        });
        Ok(AttachmentManager {
            store,
            cluster,
            events,
            policy,
            locks: OperationLocks::new(),
            states: states
                .into_iter()
                .map(|s| (s.volume_id.clone(), s))
                .collect(),
        })
    }

    /// Serialises any operation on the volume (publish, unpublish, delete).
    pub fn lock_volume(&self, id: &VolumeId) -> Result<OperationGuard, Busy> {
        self.locks.try_lock(format!("volume {id}"))
    }

    pub fn attached_nodes(&self, id: &VolumeId) -> Vec<NodeId> {
        self.states
            .get(id)
            .map(|s| s.node_ids().cloned().collect())
            .unwrap_or_default()
    }

    pub fn state(&self, id: &VolumeId) -> Option<AttachmentState> {
        self.states.get(id).map(|s| s.clone())
    }

    /// Every volume's state, for listings and the `attachments` command.
    pub fn snapshot(&self) -> Vec<AttachmentState> {
        let mut all: Vec<_> = self.states.iter().map(|s| s.clone()).collect();
        all.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        all
    }

    /// Durable before visible: the cache changes only after the store accepted it.
    async fn commit(&self, next: AttachmentState) -> Result<(), StoreError> {
        if next.is_idle(Utc::now(), self.policy.grace_period) {
            self.store.remove(&next.volume_id).await?;
            self.states.remove(&next.volume_id);
        } else {
            self.store.save(&next).await?;
            self.states.insert(next.volume_id.clone(), next);
        }
        Ok(())
    }

    pub async fn publish(
        &self,
        volume: &VolumeId,
        sharing: Sharing,
        migration_timeout: Duration,
        req: PublishRequest,
    ) -> Result<PublishOutcome, AttachError> {
        let _guard = self.lock_volume(volume)?;
        let current = self
            .state(volume)
            .unwrap_or_else(|| AttachmentState::new(volume.clone(), sharing, migration_timeout));
        let holders: Vec<NodeId> = current.node_ids().cloned().collect();
        let mut asked = holders.clone();
        asked.push(req.node_id.clone());
        let mut gone_nodes = self.cluster.gone_nodes(&asked).await?;
        if gone_nodes.contains(&req.node_id) {
            return Err(AttachError::UnknownNode(req.node_id));
        }
        gone_nodes.retain(|n| n != &req.node_id);
        let ctx = PublishContext {
            now: Utc::now(),
            grace: self.policy.grace_period,
            gone_nodes,
        };
        let decision = match decide_publish(&current, &req, &ctx) {
            Ok(d) => d,
            Err(refusal) => {
                let kind = match &refusal {
                    PublishRefusal::HeldElsewhere { .. } => Some("rwo_held"),
                    PublishRefusal::MigrationLimit { .. } => Some("migration_limit"),
                    PublishRefusal::MigrationTimedOut { .. } => Some("migration_timed_out"),
                    PublishRefusal::ReadOnlyRequired { .. }
                    | PublishRefusal::ReadonlyMismatch { .. } => None,
                };
                if let Some(kind) = kind {
                    self.events.emit(&AttachEvent::AttachConflict {
                        volume: volume.clone(),
                        requester: req.node_id.clone(),
                        holders,
                        kind,
                        message: refusal.to_string(),
                    });
                }
                return Err(refusal.into());
            }
        };
        let node = req.node_id;
        let (next, outcome, event) = match decision {
            PublishDecision::AlreadyAttached => return Ok(PublishOutcome::AlreadyAttached),
            PublishDecision::Attached(next) => (next, PublishOutcome::Attached, None),
            PublishDecision::HandedOff { from, next } => (
                next,
                PublishOutcome::HandedOff,
                Some(AttachEvent::HandedOff {
                    volume: volume.clone(),
                    from,
                    to: node.clone(),
                }),
            ),
            PublishDecision::StaleHolderCleared { holder, next } => (
                next,
                PublishOutcome::StaleHolderCleared,
                Some(AttachEvent::StaleHolderCleared {
                    volume: volume.clone(),
                    holder,
                    to: node.clone(),
                }),
            ),
            PublishDecision::MigrationStarted(next) => {
                let source = next.nodes[0].node_id.clone();
                (
                    next,
                    PublishOutcome::MigrationStarted,
                    Some(AttachEvent::MigrationStarted {
                        volume: volume.clone(),
                        source,
                        target: node.clone(),
                    }),
                )
            }
        };
        self.commit(next).await?;
        self.events.emit(&AttachEvent::Attached {
            volume: volume.clone(),
            node,
        });
        if let Some(e) = event {
            self.events.emit(&e);
        }
        Ok(outcome)
    }

    pub async fn unpublish(&self, volume: &VolumeId, node: &NodeId) -> Result<(), AttachError> {
        let _guard = self.lock_volume(volume)?;
        let Some(current) = self.state(volume) else {
            return Ok(());
        };
        let now = Utc::now();
        let (next, event) = match decide_unpublish(&current, node, now, self.policy.grace_period) {
            UnpublishDecision::NotAttached => return Ok(()),
            UnpublishDecision::Detached(next) => (next, None),
            UnpublishDecision::MigrationCompleted {
                next,
                started,
                target,
            } => (
                next,
                Some(AttachEvent::MigrationCompleted {
                    volume: volume.clone(),
                    source: node.clone(),
                    target,
                    duration: elapsed_since(started, now),
                }),
            ),
            UnpublishDecision::MigrationAborted {
                next,
                started,
                source_node,
            } => (
                next,
                Some(AttachEvent::MigrationAborted {
                    volume: volume.clone(),
                    source: source_node,
                    target: node.clone(),
                    duration: elapsed_since(started, now),
                }),
            ),
        };
        self.commit(next).await?;
        self.events.emit(&AttachEvent::Detached {
            volume: volume.clone(),
            node: node.clone(),
        });
        if let Some(e) = event {
            self.events.emit(&e);
        }
        Ok(())
    }

    /// One reconciler pass: report overdue migrations once, drop expired release
    /// records, and clear attachments the cluster says are gone. Volumes busy with an
    /// RPC are skipped and looked at next time.
    pub async fn reconcile(&self, min_age: Duration) -> Result<ReconcileReport, AttachError> {
        let mut report = ReconcileReport::default();
        let ids: Vec<VolumeId> = self.states.iter().map(|s| s.key().clone()).collect();
        let objects = self.cluster.attachments().await?.map(cluster::index);
        for id in ids {
            let Ok(_guard) = self.lock_volume(&id) else {
                report.skipped_busy += 1;
                continue;
            };
            let Some(mut state) = self.state(&id) else {
                continue;
            };
            let now = Utc::now();
            let before = state.clone();
            let holders: Vec<NodeId> = state.node_ids().cloned().collect();
            let mut stale = self.cluster.gone_nodes(&holders).await?;
            if let Some(objects) = objects.as_ref() {
                let objects: Vec<&NodeId> = objects
                    .get(&id)
                    .into_iter()
                    .flatten()
                    .map(|o| &o.node)
                    .collect();
                let old_enough = |n: &NodeId| {
                    state.nodes.iter().any(|a| {
                        &a.node_id == n
                            && elapsed_since(Some(a.attached_at), now).is_some_and(|d| d >= min_age)
                    })
                };
                stale.extend(
                    holders
                        .iter()
                        .filter(|n| !objects.contains(n) && old_enough(n))
                        .cloned(),
                );
            }
            stale.sort();
            stale.dedup();
            for node in &stale {
                state.nodes.retain(|a| &a.node_id != node);
                report.cleared.push((id.clone(), node.clone()));
            }
            if state.nodes.len() < 2 {
                state.migration_started_at = None;
                state.migration_timed_out = false;
            }
            if state.migration_overdue(now) && !state.migration_timed_out {
                state.migration_timed_out = true;
                self.events.emit(&AttachEvent::MigrationTimedOut {
                    volume: id.clone(),
                    source: state.nodes[0].node_id.clone(),
                    target: state.nodes[1].node_id.clone(),
                    timeout_secs: state.migration_timeout_secs,
                });
                report.timed_out += 1;
            }
            let idle = state.is_idle(now, self.policy.grace_period);
            if state != before || idle {
                self.commit(state).await?;
                for node in stale {
                    self.events.emit(&AttachEvent::Detached {
                        volume: id.clone(),
                        node,
                    });
                }
                if idle {
                    report.reclaimed += 1;
                }
            }
        }
        Ok(report)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub cleared: Vec<(VolumeId, NodeId)>,
    pub timed_out: usize,
    pub reclaimed: usize,
    pub skipped_busy: usize,
}

/// Runs `reconcile` every `interval` until the returned task is dropped/aborted.
pub fn spawn_reconciler(
    manager: Arc<AttachmentManager>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match manager.reconcile(interval * 2).await {
                Ok(r) if r.cleared.is_empty() && r.timed_out == 0 => {}
                Ok(r) => tracing::info!(
                    cleared = r.cleared.len(),
                    timed_out = r.timed_out,
                    reclaimed = r.reclaimed,
                    "reconciled attachments"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "attachment reconcile failed; retrying next interval")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;
