//! The reconciler: a background pass over every volume that retries pending fences,
//! clears holders the cluster shows gone (fenced first, on evidence only), names and
//! times migrations as KubeVirt publishes them, and reports overdue ones. Its decisions
//! are the pure functions of `reconcile`; this is the loading, committing, fencing and
//! telling around them.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::backend::Fencing;

impl AttachmentManager {
    /// Ties a running dual attach to its KubeVirt migration when it was not matched at
    /// the second attach (its target pod was not visible then); the start time is kept.
    async fn match_late(&self, state: &mut AttachmentState) -> Result<bool, ClusterError> {
        let [source, target] = state.nodes.as_slice() else {
            return Ok(false);
        };
        if state.sharing != Sharing::Rwx || state.migration.is_some() {
            return Ok(false);
        }
        let w = self
            .cluster
            .workload(&state.volume_id, &source.node_id, &target.node_id, false)
            .await?;
        let Some(migration) = w.migration else {
            return Ok(false);
        };
        state.migration = Some(migration);
        Ok(true)
    }

    /// Follows the matched migration's clock as KubeVirt publishes it: its configuration
    /// (a MigrationPolicy's per-GiB timeout, post-copy) arrives at target hand-off and its
    /// start time when memory starts moving, both after the attach that began the dual
    /// attach. A deadline moved later than now clears the overdue report.
    async fn refresh_clock(
        &self,
        state: &mut AttachmentState,
        now: DateTime<Utc>,
    ) -> Result<bool, ClusterError> {
        let (2, Some(m), Some(started)) = (
            state.nodes.len(),
            state.migration.as_ref(),
            state.migration_started_at,
        ) else {
            return Ok(false);
        };
        let Some(clock) = self.cluster.migration_clock(m).await? else {
            return Ok(false);
        };
        let timeout = clock.timeout_from(started).as_secs();
        if timeout == state.migration_timeout_secs
            && state.deadline_basis.as_ref() == Some(&clock.basis)
        {
            return Ok(false);
        }
        tracing::info!(volume_id = %state.volume_id, migration = %m, timeout_secs = timeout, basis = %clock.basis, "migration deadline follows KubeVirt's clock");
        state.migration_timeout_secs = timeout;
        state.deadline_basis = Some(clock.basis);
        if state.migration_overdue && !state.past_deadline(now) {
            state.migration_overdue = false;
        }
        Ok(true)
    }

    /// One reconciler pass: retry pending fences, clear holders the cluster shows gone
    /// (fenced first, on evidence only), report overdue migrations once and drop expired
    /// release records. Volumes busy with an RPC are skipped and looked at next time; a
    /// stale write is retried next pass.
    pub async fn reconcile(&self, min_age: Duration) -> Result<ReconcileReport, AttachError> {
        let mut report = ReconcileReport::default();
        let ids: Vec<VolumeId> = self
            .store
            .load_all()
            .await?
            .into_iter()
            .map(|s| s.volume_id)
            .collect();
        // A fresh read, not a watch cache that may be stuck: a missing object clears a
        // holder only when the API server itself says so.
        let objects = match self.cluster.confirmed_attachments().await {
            Ok(objects) => objects.map(cluster::index),
            Err(e) => {
                tracing::warn!(error = %e, "VolumeAttachments could not be read; no holder is cleared for a missing object this pass");
                None
            }
        };
        for id in ids {
            let Ok(_guard) = self.lock_volume(&id) else {
                report.skipped_busy += 1;
                continue;
            };
            match self
                .reconcile_volume(&id, objects.as_ref(), min_age, &mut report)
                .await
            {
                Ok(()) => {}
                Err(AttachError::Store(StoreError::Stale { .. })) => {}
                Err(e) => {
                    tracing::warn!(volume_id = %id, error = %e, "reconcile of volume failed; retried next pass");
                    report.failed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Marks the candidates as leaving (as an unpublish does), then fences each: the
    /// ones the target confirmed, with how, and the ones still to be fenced.
    async fn fence_candidates(
        &self,
        id: &VolumeId,
        state: AttachmentState,
        candidates: Vec<NodeId>,
        report: &mut ReconcileReport,
    ) -> Result<(AttachmentState, Vec<(NodeId, Fencing)>, Vec<NodeId>), AttachError> {
        let mut marked = state.clone();
        let mut newly = false;
        for c in &candidates {
            newly |= marked.mark_fencing(c);
        }
        let state = if newly && !self.fence.is_noop() {
            self.store.save(&marked).await?;
            self.store.load(id).await?.unwrap_or(marked)
        } else {
            state
        };
        let candidates: Vec<NodeId> = candidates
            .into_iter()
            .filter(|c| state.node_ids().any(|n| n == c))
            .collect();
        let (mut cleared, mut unfenced) = (Vec::new(), Vec::new());
        for node in candidates {
            match self.fence_reported(id, &node).await {
                Ok(r) => cleared.push((node, r.method)),
                Err(_) => {
                    report.unfenced += 1;
                    unfenced.push(node);
                }
            }
        }
        Ok((state, cleared, unfenced))
    }

    async fn reconcile_volume(
        &self,
        id: &VolumeId,
        objects: Option<&cluster::AttachmentIndex>,
        min_age: Duration,
        report: &mut ReconcileReport,
    ) -> Result<(), AttachError> {
        let Some(state) = self.store.load(id).await? else {
            return Ok(());
        };
        let now = Utc::now();
        let holders: Vec<NodeId> = state.node_ids().cloned().collect();
        let gone = self.cluster.gone_nodes(&holders).await?;
        let va_nodes: Option<Vec<NodeId>> = objects.map(|o| {
            o.get(id)
                .into_iter()
                .flatten()
                .map(|o| o.node.clone())
                .collect()
        });
        let evidence = Evidence {
            gone_nodes: &gone,
            va_nodes: va_nodes.as_deref(),
        };
        let candidates = reconcile_candidates(&state, &evidence, now, min_age);
        let (state, cleared, unfenced) =
            self.fence_candidates(id, state, candidates, report).await?;
        let loaded = state.clone();
        let mut before = state;
        // Naming and timing a migration is information: a cluster read that fails here
        // must not hold up fences and clears, so it is logged and tried next pass.
        let matched = self.match_late(&mut before).await.unwrap_or_else(|e| {
            tracing::warn!(volume_id = %id, error = %e, "could not match the dual attach to a migration this pass");
            false
        });
        if let Err(e) = self.refresh_clock(&mut before, now).await {
            tracing::warn!(volume_id = %id, error = %e, "could not follow the migration's clock this pass");
        }
        let cleared_nodes: Vec<NodeId> = cleared.iter().map(|(n, _)| n.clone()).collect();
        let decision = decide_reconcile(&before, &cleared_nodes, &unfenced, now);
        let mut next = decision.next;
        for (node, method) in &cleared {
            next.record_fence(node, now, *method);
        }
        let idle = next.is_idle(now, self.policy.grace_period);
        if next == loaded && !idle {
            return Ok(());
        }
        let ended_event = match decision.ended {
            Some(ended) => Some(self.migration_ended(id, &before, ended, now).await?),
            None => None,
        };
        self.commit(&next).await?;
        if matched {
            if let Some(m) = active_migration(&next) {
                self.events.emit(&AttachEvent::MigrationMatched(m));
            }
        }
        if decision.overdue {
            self.events.emit(&AttachEvent::MigrationOverdue {
                volume: id.clone(),
                source: next.nodes[0].node_id.clone(),
                target: next.nodes[1].node_id.clone(),
                migration: next.migration.clone(),
                timeout_secs: next.migration_timeout_secs,
            });
            report.overdue += 1;
        }
        if let Some(e) = ended_event {
            self.events.emit(&e);
        }
        for node in cleared_nodes {
            report.cleared.push((id.clone(), node.clone()));
            if let Some(to) = next.nodes.first() {
                self.events.emit(&AttachEvent::StaleHolderCleared {
                    volume: id.clone(),
                    holder: node.clone(),
                    to: to.node_id.clone(),
                });
            }
            self.events.emit(&AttachEvent::Detached {
                volume: id.clone(),
                node,
            });
        }
        if idle {
            report.reclaimed += 1;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub cleared: Vec<(VolumeId, NodeId)>,
    pub overdue: usize,
    pub reclaimed: usize,
    pub skipped_busy: usize,
    /// Fences that failed again (their nodes keep their slots).
    pub unfenced: usize,
    /// Volumes whose pass failed (retried next time).
    pub failed: usize,
}

/// Whether this replica may run background work (the reconciler) now: with several
/// controller replicas, only the one holding the driver's lease does.
pub trait BackgroundGate: Send + Sync + 'static {
    fn may_act(&self) -> bool;
}

/// A single controller (no Kubernetes): always.
#[derive(Debug, Default, Clone, Copy)]
pub struct Always;

impl BackgroundGate for Always {
    fn may_act(&self) -> bool {
        true
    }
}

/// Runs `reconcile` every `interval`, while `gate` allows, until the returned task is
/// dropped/aborted.
pub fn spawn_reconciler(
    manager: Arc<AttachmentManager>,
    interval: Duration,
    gate: Arc<dyn BackgroundGate>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !gate.may_act() {
                tracing::debug!("another replica holds the background lease; not reconciling");
                continue;
            }
            match manager.reconcile(interval * 2).await {
                Ok(r) if r.cleared.is_empty() && r.overdue == 0 && r.unfenced == 0 => {}
                Ok(r) => tracing::info!(
                    cleared = r.cleared.len(),
                    overdue = r.overdue,
                    unfenced = r.unfenced,
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
