//! The AttachmentManager: which nodes may hold a volume, decided under a per-volume
//! lock, persisted before the caller is told, and rebuilt from the store at start-up.

pub mod cluster;
pub mod deadline;
pub mod events;
pub mod fence;
pub mod rebuild;
pub mod reconcile;
mod reconciler;
pub mod report;
pub mod state;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use self::cluster::{ClusterError, ClusterView, NodeKnown};
use self::events::{ActiveMigration, AttachEvent, EventSink};
use self::fence::{FenceError, FenceReport, NoFence, NodeFence};
use self::reconcile::{decide_reconcile, reconcile_candidates, Evidence};
use self::state::{
    decide_publish, decide_unpublish, migration_outcome, AttachmentState, EndedMigration,
    PublishContext, PublishDecision, PublishRefusal, PublishRequest, UnpublishDecision, Workload,
};
use self::store::{AttachmentStore, StoreError};
use crate::backend::{Backend, BackendError, VolumeRecord};
use crate::capability::Sharing;
use crate::export::ExportInfo;
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
    #[error("node {node} is not known: {why}")]
    UnregisteredNode { node: NodeId, why: String },
    #[error("volume {volume} was unpublished from node {node} while this publish was granting it access; the grant was withdrawn, retry the publish")]
    Withdrawn { volume: VolumeId, node: NodeId },
    /// The holder keeps its slot (marked "fencing"); the reconciler retries.
    #[error("{0}; the node stays recorded as attached until the fence is confirmed (retried by the reconciler and by the next unpublish)")]
    Fence(#[from] FenceError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What a successful publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    AlreadyAttached,
    Attached,
    HandedOff,
    StaleHolderCleared,
    MigrationStarted,
    /// Published again to a node whose unpublish was waiting for its fence.
    Reclaimed,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How long a detached RWO holder is remembered (0 disables).
    pub grace_period: Duration,
    /// Let pods of different workloads share an RWX block volume (their own cluster
    /// filesystem keeps it consistent); off by default: one VM per disk.
    pub allow_rwx_block_sharing: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            grace_period: Duration::from_secs(30),
            allow_rwx_block_sharing: false,
        }
    }
}

/// The migration a two-node RWX state is running, for observers.
pub fn active_migration(state: &AttachmentState) -> Option<ActiveMigration> {
    match (state.sharing, state.nodes.as_slice()) {
        (Sharing::Rwx, [source, target]) => Some(ActiveMigration {
            volume: state.volume_id.clone(),
            source: source.node_id.clone(),
            target: target.node_id.clone(),
            migration: state.migration.clone(),
            deadline: state.migration_deadline(),
            overdue: state.migration_overdue,
        }),
        _ => None,
    }
}

pub struct AttachmentManager {
    store: Arc<dyn AttachmentStore>,
    cluster: Arc<dyn ClusterView>,
    events: Arc<dyn EventSink>,
    fence: Arc<dyn NodeFence>,
    policy: Policy,
    locks: OperationLocks,
}

/// How long a publish or unpublish waits for another operation on the same volume.
pub const CONTROLLER_LOCK_WAIT: Duration = Duration::from_secs(3);

/// How often a decision is re-made after the store reported it stale.
const STALE_RETRIES: u32 = 5;

fn elapsed_since(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Duration> {
    t.and_then(|t| (now - t).to_std().ok())
}

fn conflict_kind(refusal: &PublishRefusal) -> Option<&'static str> {
    match refusal {
        PublishRefusal::HeldElsewhere { .. } => Some("rwo_held"),
        PublishRefusal::MigrationLimit { .. } => Some("migration_limit"),
        PublishRefusal::MigrationTimedOut { .. } => Some("migration_timed_out"),
        PublishRefusal::SharedWithOtherWorkloads { .. } => Some("shared_with_other_workloads"),
        PublishRefusal::Unfenced { .. } => Some("unfenced_holder"),
        PublishRefusal::RwoConflict { .. } => Some("rwo_conflict"),
        PublishRefusal::SingleWriter { .. } => Some("single_writer"),
        PublishRefusal::ReadOnlyRequired { .. }
        | PublishRefusal::ReadonlyMismatch { .. }
        | PublishRefusal::PublishedDifferently { .. }
        | PublishRefusal::ModeMismatch { .. } => None,
    }
}

impl AttachmentManager {
    /// Cross-checks the stored state with the cluster and repairs it; call before
    /// serving Controller RPCs.
    pub async fn load(
        store: Arc<dyn AttachmentStore>,
        cluster: Arc<dyn ClusterView>,
        events: Arc<dyn EventSink>,
        policy: Policy,
    ) -> Result<Self, AttachError> {
        let loaded = store.load_all().await?;
        let states =
            rebuild::cross_check(loaded, cluster.as_ref(), store.as_ref(), events.as_ref()).await;
        events.emit(&AttachEvent::Restored {
            volumes: states.len(),
            migrations: states.iter().filter_map(active_migration).collect(),
        });
        Ok(AttachmentManager {
            store,
            cluster,
            events,
            fence: Arc::new(NoFence),
            policy,
            locks: OperationLocks::new(),
        })
    }

    /// The data plane that cuts off a node leaving the volume (before its slot is freed).
    pub fn with_fence(mut self, fence: Arc<dyn NodeFence>) -> Self {
        self.fence = fence;
        self
    }

    /// Asks the data plane to cut `node` off, and reports what came of it.
    async fn fence_reported(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<FenceReport, FenceError> {
        let result = self.fence.fence(volume, node).await;
        let (connections, ok) = match &result {
            Ok(r) if r.method == crate::backend::Fencing::None => return result,
            Ok(r) => (r.connections, true),
            Err(e) => {
                tracing::warn!(volume_id = %volume, node_id = %node, error = %e, "fence failed; the node keeps its slot");
                (None, false)
            }
        };
        self.events.emit(&AttachEvent::Fenced {
            volume: volume.clone(),
            node: node.clone(),
            connections,
            ok,
        });
        result
    }

    /// Marks `node` as leaving ("fencing") in the store before its fence, so that a
    /// publish that granted it access concurrently sees the mark on its re-check and
    /// withdraws the grant: no late grant survives the fence. Returns the state as
    /// stored now. Skipped where fences are no-ops (no grants exist there).
    async fn mark_leaving(
        &self,
        state: AttachmentState,
        node: &NodeId,
    ) -> Result<AttachmentState, AttachError> {
        let mut marked = state.clone();
        if self.fence.is_noop() || !marked.mark_fencing(node) {
            return Ok(state);
        }
        self.store.save(&marked).await?;
        // The stored version moved on: decide again on what is stored now.
        Ok(self.store.load(&state.volume_id).await?.unwrap_or(marked))
    }

    /// Cuts `node` off at the data plane before it leaves the stored state. On failure
    /// it stays recorded (marked as leaving), so nothing else is admitted in its place.
    async fn fence_holder(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<FenceReport, AttachError> {
        Ok(self.fence_reported(volume, node).await?)
    }

    /// Serialises any operation on the volume (publish, unpublish, delete).
    pub fn lock_volume(&self, id: &VolumeId) -> Result<OperationGuard, Busy> {
        self.locks.try_lock(format!("volume {id}"))
    }

    /// The same lock for publish/unpublish: they wait a little for a decision in progress
    /// (milliseconds) instead of answering Aborted at once.
    async fn lock_volume_waiting(&self, id: &VolumeId) -> Result<OperationGuard, Busy> {
        self.locks
            .lock_within(format!("volume {id}"), CONTROLLER_LOCK_WAIT)
            .await
    }

    /// After a publish granted `node` access at the target: confirms on fresh state that
    /// it still holds the volume (and when it was attached). If an unpublish or a
    /// reconcile elsewhere freed it in between, the grant is withdrawn (fenced again)
    /// and the publish fails to be retried: a late grant never outlives the fence.
    pub async fn confirm_holder(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<DateTime<Utc>, AttachError> {
        let state = self.store.load(volume).await?;
        let holder = state
            .as_ref()
            .and_then(|s| s.nodes.iter().find(|a| &a.node_id == node));
        if let Some(a) = holder.filter(|a| !a.fencing) {
            return Ok(a.attached_at);
        }
        tracing::warn!(volume_id = %volume, node_id = %node, "the node was freed while its publish was granting access; withdrawing the grant");
        if let Err(e) = self.fence_reported(volume, node).await {
            // The grant stands: record the node as leaving, so its slot stays taken
            // until the reconciler's fence succeeds.
            if holder.is_none() {
                // No record left: one that allows nobody else (RWO) until it is fenced.
                let mut s = state.unwrap_or_else(|| {
                    AttachmentState::new(
                        volume.clone(),
                        Sharing::Rwo,
                        state::DEFAULT_MIGRATION_TIMEOUT,
                    )
                });
                s.nodes.push(state::NodeAttachment {
                    node_id: node.clone(),
                    attached_at: Utc::now(),
                    readonly: false,
                    access: None,
                    fencing: true,
                });
                if let Err(se) = self.store.save(&s).await {
                    tracing::error!(volume_id = %volume, node_id = %node, error = %se, "a withdrawn grant could not be fenced nor recorded; check the storage target");
                }
            }
            return Err(e.into());
        }
        Err(AttachError::Withdrawn {
            volume: volume.clone(),
            node: node.clone(),
        })
    }

    pub async fn attached_nodes(&self, id: &VolumeId) -> Result<Vec<NodeId>, AttachError> {
        Ok(self
            .state(id)
            .await?
            .map(|s| s.node_ids().cloned().collect())
            .unwrap_or_default())
    }

    pub async fn state(&self, id: &VolumeId) -> Result<Option<AttachmentState>, AttachError> {
        Ok(self.store.load(id).await?)
    }

    /// Every volume's state, for listings and the `attachments` command.
    pub async fn snapshot(&self) -> Result<Vec<AttachmentState>, AttachError> {
        let mut all = self.store.load_all().await?;
        all.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(all)
    }

    /// Durable before OK: nothing is reported before the store accepted it.
    async fn commit(&self, next: &AttachmentState) -> Result<(), StoreError> {
        if next.is_idle(Utc::now(), self.policy.grace_period) {
            self.store.remove(next).await
        } else {
            self.store.save(next).await
        }
    }

    pub async fn publish(
        &self,
        volume: &VolumeId,
        migration_timeout: Duration,
        req: PublishRequest,
    ) -> Result<PublishOutcome, AttachError> {
        let _guard = self.lock_volume_waiting(volume).await?;
        self.on_fresh_state(volume, || self.try_publish(volume, migration_timeout, &req))
            .await
    }

    /// Runs `decide` until it was not made on stale state (a bounded number of times):
    /// a decision on state another replica changed meanwhile is made again.
    async fn on_fresh_state<T, Fut>(
        &self,
        volume: &VolumeId,
        mut decide: impl FnMut() -> Fut,
    ) -> Result<T, AttachError>
    where
        Fut: std::future::Future<Output = Result<T, AttachError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match decide().await {
                Err(AttachError::Store(StoreError::Stale { object }))
                    if attempt < STALE_RETRIES =>
                {
                    tracing::debug!(volume_id = %volume, object, attempt, "stale attachment state; deciding again");
                }
                Err(AttachError::Store(StoreError::Stale { object })) => {
                    return Err(StoreError::Conflict {
                        object,
                        attempts: attempt,
                    }
                    .into())
                }
                other => return self.reported(volume, other),
            }
        }
    }

    /// ControllerPublish: the attach decision, then the grant at the storage target and
    /// the export the node dials, then a re-check on fresh state that the node still
    /// holds the volume under the same attachment (a late grant never outlives the
    /// fence; an export made for an attachment that was replaced is not handed out).
    pub async fn publish_and_grant(
        &self,
        backend: &dyn Backend,
        volume: &VolumeRecord,
        req: PublishRequest,
    ) -> Result<ExportInfo, AttachError> {
        let node = req.node_id.clone();
        self.publish(&volume.id, volume.parameters.migration_timeout, req)
            .await?;
        let attached_at = self.confirm_holder(&volume.id, &node).await?;
        let export = backend
            .export_attachment(volume, &node, attached_at)
            .await?;
        backend.allow_node(volume, &node).await?;
        if self.confirm_holder(&volume.id, &node).await? != attached_at {
            return Err(AttachError::Withdrawn {
                volume: volume.id.clone(),
                node,
            });
        }
        Ok(export)
    }

    /// Reports a quarantined volume (event, metric) each time an RPC is refused for it.
    fn reported<T>(
        &self,
        volume: &VolumeId,
        result: Result<T, AttachError>,
    ) -> Result<T, AttachError> {
        if let Err(AttachError::Store(
            e @ (StoreError::Quarantined { .. } | StoreError::Corrupt { .. }),
        )) = &result
        {
            self.events.emit(&AttachEvent::Quarantined {
                volume: volume.clone(),
                reason: e.to_string(),
            });
        }
        result
    }

    /// What a publish decision needs to know of the cluster: the requester is a known,
    /// live node; which holders are gone; and, for a would-be second node of an RWX
    /// volume, who uses it.
    async fn evidence(
        &self,
        current: &AttachmentState,
        req: &PublishRequest,
        migration_timeout: Duration,
    ) -> Result<PublishContext, AttachError> {
        let holders: Vec<NodeId> = current.node_ids().cloned().collect();
        let mut asked = holders.clone();
        asked.push(req.node_id.clone());
        if let NodeKnown::No(why) = self.cluster.node_known(&req.node_id).await? {
            return Err(AttachError::UnregisteredNode {
                node: req.node_id.clone(),
                why,
            });
        }
        let mut gone_nodes = self.cluster.gone_nodes(&asked).await?;
        if gone_nodes.contains(&req.node_id) {
            return Err(AttachError::UnknownNode(req.node_id.clone()));
        }
        gone_nodes.retain(|n| n != &req.node_id);
        // Only a would-be second node of an RWX volume needs to know who uses it.
        let workload = match (current.sharing, holders.as_slice()) {
            (Sharing::Rwx, [holder]) if holder != &req.node_id => {
                self.cluster
                    .workload(
                        &current.volume_id,
                        holder,
                        &req.node_id,
                        !self.policy.allow_rwx_block_sharing,
                    )
                    .await?
            }
            _ => Workload::default(),
        };
        Ok(PublishContext {
            now: Utc::now(),
            grace: self.policy.grace_period,
            gone_nodes,
            migration_timeout,
            workload,
        })
    }

    async fn try_publish(
        &self,
        volume: &VolumeId,
        migration_timeout: Duration,
        req: &PublishRequest,
    ) -> Result<PublishOutcome, AttachError> {
        let sharing = req.access.mode.sharing();
        let current =
            self.store.load(volume).await?.unwrap_or_else(|| {
                AttachmentState::new(volume.clone(), sharing, migration_timeout)
            });
        let holders: Vec<NodeId> = current.node_ids().cloned().collect();
        let ctx = self.evidence(&current, req, migration_timeout).await?;
        let decision = match decide_publish(&current, req, &ctx) {
            Ok(d) => d,
            Err(refusal) => {
                if let Some(kind) = conflict_kind(&refusal) {
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
        let node = req.node_id.clone();
        let (next, outcome, event) = match decision {
            PublishDecision::AlreadyAttached => return Ok(PublishOutcome::AlreadyAttached),
            PublishDecision::Attached(next) => (next, PublishOutcome::Attached, None),
            PublishDecision::Reclaimed(next) => (next, PublishOutcome::Reclaimed, None),
            PublishDecision::HandedOff { from, next } => (
                next,
                PublishOutcome::HandedOff,
                Some(AttachEvent::HandedOff {
                    volume: volume.clone(),
                    from,
                    to: node.clone(),
                }),
            ),
            PublishDecision::StaleHolderCleared { holder, next } => {
                // Its Node is gone, but its last connection may not be: mark it, cut it,
                // then free it. After the mark the decision is made again on the
                // stored state (the retry loop re-reads it).
                if !self.fence.is_noop() && !current.unfenced().any(|n| n == &holder) {
                    self.mark_leaving(current.clone(), &holder).await?;
                    return Err(StoreError::Stale {
                        object: format!("volume {volume} (holder {holder} marked as leaving)"),
                    }
                    .into());
                }
                let report = self.fence_holder(volume, &holder).await?;
                let mut next = next;
                next.record_fence(&holder, ctx.now, report.method);
                (
                    next,
                    PublishOutcome::StaleHolderCleared,
                    Some(AttachEvent::StaleHolderCleared {
                        volume: volume.clone(),
                        holder,
                        to: node.clone(),
                    }),
                )
            }
            PublishDecision::MigrationStarted(next) => {
                let started = active_migration(&next).map(AttachEvent::MigrationStarted);
                (next, PublishOutcome::MigrationStarted, started)
            }
        };
        self.commit(&next).await?;
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
        let _guard = self.lock_volume_waiting(volume).await?;
        self.on_fresh_state(volume, || self.try_unpublish(volume, node))
            .await
    }

    async fn try_unpublish(&self, volume: &VolumeId, node: &NodeId) -> Result<(), AttachError> {
        let Some(current) = self.store.load(volume).await? else {
            return Ok(());
        };
        if decide_unpublish(&current, node, Utc::now(), self.policy.grace_period)
            == UnpublishDecision::NotAttached
        {
            return Ok(());
        }
        let current = self.mark_leaving(current, node).await?;
        let now = Utc::now();
        let (mut next, event) =
            match decide_unpublish(&current, node, now, self.policy.grace_period) {
                UnpublishDecision::NotAttached => return Ok(()),
                UnpublishDecision::Detached(next) => (next, None),
                UnpublishDecision::MigrationEnded { next, ended } => {
                    let event = self.migration_ended(volume, &current, ended, now).await?;
                    (next, Some(event))
                }
            };
        // Fence before free: the slot is given up only once the target cut the node off.
        let report = self.fence_holder(volume, node).await?;
        next.record_fence(node, now, report.method);
        self.commit(&next).await?;
        self.events.emit(&AttachEvent::Detached {
            volume: volume.clone(),
            node: node.clone(),
        });
        if let Some(e) = event {
            self.events.emit(&e);
        }
        Ok(())
    }

    /// The event for a migration that just ended: the outcome comes from the migration
    /// object's phase when there is one, from detach order otherwise.
    async fn migration_ended(
        &self,
        volume: &VolumeId,
        before: &AttachmentState,
        ended: EndedMigration,
        now: DateTime<Utc>,
    ) -> Result<AttachEvent, ClusterError> {
        let phase = match &ended.migration {
            Some(m) => self.cluster.migration_phase(m).await?,
            None => None,
        };
        let (outcome, basis) = migration_outcome(&ended, phase.as_ref());
        let remaining = if ended.source_left {
            ended.target.clone()
        } else {
            ended.source.clone()
        };
        Ok(AttachEvent::MigrationEnded {
            volume: volume.clone(),
            source: ended.source,
            target: ended.target,
            remaining,
            outcome,
            basis,
            migration: ended.migration,
            duration: elapsed_since(ended.started, now),
            was_overdue: before.migration_overdue,
        })
    }
}

pub use reconciler::{spawn_reconciler, Always, BackgroundGate, ReconcileReport};

#[cfg(test)]
mod tests;
