//! Attachment state and the pure publish/unpublish decisions over it. No I/O here:
//! every rule is a function of (state, request, context), tested exhaustively below.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::{Fencing, StoredCapability};
use crate::capability::{AccessMode, Sharing};
use crate::ids::{NodeId, VolumeId};

pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAttachment {
    pub node_id: NodeId,
    pub attached_at: DateTime<Utc>,
    #[serde(default)]
    pub readonly: bool,
    /// The access mode and type it was published with (absent in records written before
    /// it was kept): a repeated publish with another one is a different request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<StoredCapability>,
    /// Unpublished, but the data plane has not confirmed the fence yet: it still counts
    /// as a holder, and the reconciler retries the fence.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fencing: bool,
}

/// The last RWO holder, kept for the grace period after its detach.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Released {
    pub node_id: NodeId,
    pub detached_at: DateTime<Utc>,
}

/// A node cut off at the data plane's target after it lost its attachment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fenced {
    pub node_id: NodeId,
    pub at: DateTime<Utc>,
    /// `target` (cut off there) unless the backend could only note it.
    #[serde(default)]
    pub method: Fencing,
}

/// How many fenced nodes a volume remembers (newest kept).
pub const FENCED_KEPT: usize = 4;

/// The KubeVirt migration (VirtualMachineInstanceMigration) a dual attach belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrationRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The VirtualMachineInstance being migrated.
    pub vmi: String,
}

impl std::fmt::Display for MigrationRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub use super::deadline::{DeadlineBasis, MigrationClock};

fn default_timeout_secs() -> u64 {
    DEFAULT_MIGRATION_TIMEOUT.as_secs()
}

/// Which nodes hold a volume, in order: index 0 is the primary, index 1 the target of a
/// live migration (RWX block only).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttachmentState {
    pub volume_id: VolumeId,
    pub sharing: Sharing,
    pub nodes: Vec<NodeAttachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_started_at: Option<DateTime<Utc>>,
    #[serde(default = "default_timeout_secs")]
    pub migration_timeout_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_basis: Option<DeadlineBasis>,
    /// The KubeVirt migration this dual attach belongs to, when the cluster said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRef>,
    /// Set once the running migration passed its deadline and that was reported.
    #[serde(
        default,
        alias = "migration_timed_out",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub migration_overdue: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Released>,
    /// Nodes fenced at the target while the volume stayed attached elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<Fenced>,
    /// The cluster showed this single-node volume attached to several nodes at once
    /// (found at rebuild): new publishes are refused until all but one are detached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflict: bool,
    /// Which stored version this state was read at, opaque to everything but the store
    /// (a PV's resourceVersion): a write based on an older read is refused as stale.
    #[serde(skip)]
    pub stored_version: Option<String>,
}

impl AttachmentState {
    pub fn new(volume_id: VolumeId, sharing: Sharing, migration_timeout: Duration) -> Self {
        AttachmentState {
            volume_id,
            sharing,
            nodes: Vec::new(),
            migration_started_at: None,
            migration_timeout_secs: migration_timeout.as_secs(),
            deadline_basis: None,
            migration: None,
            migration_overdue: false,
            released: None,
            fenced: Vec::new(),
            conflict: false,
            stored_version: None,
        }
    }

    pub fn node_ids(&self) -> impl Iterator<Item = &NodeId> {
        self.nodes.iter().map(|n| &n.node_id)
    }

    fn position(&self, node: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| &n.node_id == node)
    }

    pub fn migration_deadline(&self) -> Option<DateTime<Utc>> {
        let timeout = chrono::Duration::seconds(self.migration_timeout_secs as i64);
        self.migration_started_at.map(|t| t + timeout)
    }

    /// Ends the migration bookkeeping (one node left).
    pub(crate) fn clear_migration(&mut self) {
        self.migration_started_at = None;
        self.migration = None;
        self.deadline_basis = None;
        self.migration_overdue = false;
    }

    pub fn past_deadline(&self, now: DateTime<Utc>) -> bool {
        self.nodes.len() == 2 && self.migration_deadline().is_some_and(|d| now > d)
    }

    /// A released holder still within the grace period.
    fn recent_release(&self, now: DateTime<Utc>, grace: Duration) -> Option<&Released> {
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        self.released
            .as_ref()
            .filter(|r| now <= r.detached_at + grace)
    }

    /// Records that `node` was cut off at the target (newest last, bounded); nothing for
    /// a data plane with nothing to cut.
    pub fn record_fence(&mut self, node: &NodeId, at: DateTime<Utc>, method: Fencing) {
        if method == Fencing::None {
            return;
        }
        self.fenced.retain(|f| &f.node_id != node);
        self.fenced.push(Fenced {
            node_id: node.clone(),
            at,
            method,
        });
        let excess = self.fenced.len().saturating_sub(FENCED_KEPT);
        self.fenced.drain(..excess);
    }

    /// Holders whose fence is not confirmed yet.
    pub fn unfenced(&self) -> impl Iterator<Item = &NodeId> {
        self.nodes.iter().filter(|a| a.fencing).map(|a| &a.node_id)
    }

    /// Marks `node` as waiting for its fence (it keeps its slot until confirmed).
    pub fn mark_fencing(&mut self, node: &NodeId) -> bool {
        match self.nodes.iter_mut().find(|a| &a.node_id == node) {
            Some(a) if !a.fencing => {
                a.fencing = true;
                true
            }
            _ => false,
        }
    }

    /// Nothing attached and nothing worth remembering: the record can go.
    pub fn is_idle(&self, now: DateTime<Utc>, grace: Duration) -> bool {
        self.nodes.is_empty() && self.recent_release(now, grace).is_none()
    }
}

/// A ControllerPublishVolume, reduced to what the rules look at.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub node_id: NodeId,
    pub readonly: bool,
    /// The capability asked for.
    pub access: StoredCapability,
}

/// Facts from outside the state that the rules need.
#[derive(Debug, Clone, Default)]
pub struct PublishContext {
    pub now: DateTime<Utc>,
    pub grace: Duration,
    /// Holders whose Node object no longer exists (only known with Kubernetes).
    pub gone_nodes: Vec<NodeId>,
    /// The StorageClass's migration timeout, used when no VMI says better.
    pub migration_timeout: Duration,
    /// Who uses the volume, asked only for a second RWX attach.
    pub workload: Workload,
}

/// What the cluster knows about the workload using a volume (empty without Kubernetes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// Pods using the volume's claim that are not part of the VM holding it, as
    /// "namespace/pod (why)"; empty when sharing is allowed.
    pub foreign_pods: Vec<String>,
    /// The clock of the matched migration (KubeVirt's completion timeout for its VMI).
    pub vmi: Option<MigrationClock>,
    /// The running migration of that VMI towards the requesting node.
    pub migration: Option<MigrationRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishDecision {
    /// Already attached to this node with the same readonly flag: nothing to persist.
    AlreadyAttached,
    /// Published again to a node whose unpublish had not finished its fence: it holds the
    /// volume again as before.
    Reclaimed(AttachmentState),
    /// Attached as the first (primary) node.
    Attached(AttachmentState),
    /// RWO moved from a holder released within the grace period.
    HandedOff { from: NodeId, next: AttachmentState },
    /// RWO holder's node was deleted from the cluster: its attachment is cleared.
    StaleHolderCleared {
        holder: NodeId,
        next: AttachmentState,
    },
    /// Attached as the second node of an RWX block volume: a live migration begins.
    MigrationStarted(AttachmentState),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefusal {
    #[error("volume {volume} is attached read-write-once to node {holder}; detach it there first (live migration between nodes needs an RWX volume in Block mode)")]
    HeldElsewhere { volume: VolumeId, holder: NodeId },
    #[error("migration limit: volume {volume} is already attached to {source_node} and {target}; a third node must wait until the migration completes or is aborted")]
    MigrationLimit {
        volume: VolumeId,
        source_node: NodeId,
        target: NodeId,
    },
    #[error("migration of volume {volume} from {source_node} to {target} started at {started} and passed its {timeout_secs}s deadline; both nodes keep access, but no new node is attached until one side is detached (complete or cancel the VirtualMachineInstanceMigration, or delete the stuck target pod); raise migrationTimeoutSeconds for VMs with large memory")]
    MigrationTimedOut {
        volume: VolumeId,
        source_node: NodeId,
        target: NodeId,
        started: DateTime<Utc>,
        timeout_secs: u64,
    },
    #[error("volume {volume} is attached to {holder} and may only be shared with a live-migration target of the same VM, but pods of other workloads use its claim: {}; a raw block device written from two VMs is corrupted — stop those pods, or start the controller with --allow-rwx-block-sharing if they run a cluster filesystem", pods.join(", "))]
    SharedWithOtherWorkloads {
        volume: VolumeId,
        holder: NodeId,
        pods: Vec<String>,
    },
    #[error("volume {volume} is multi-node read-only: publish it with readonly=true")]
    ReadOnlyRequired { volume: VolumeId },
    #[error("volume {volume} is already published to node {node} with readonly={existing}; unpublish it before publishing with readonly={requested}")]
    ReadonlyMismatch {
        volume: VolumeId,
        node: NodeId,
        existing: bool,
        requested: bool,
    },
    #[error("volume {volume} is already published to node {node} as {existing}; unpublish it before publishing it as {requested}")]
    PublishedDifferently {
        volume: VolumeId,
        node: NodeId,
        existing: String,
        requested: String,
    },
    #[error("volume {volume} is attached to {holders} with access mode {attached:?}; a publish with {requested:?} contradicts it (all nodes of a volume use one access mode)")]
    ModeMismatch {
        volume: VolumeId,
        holders: String,
        attached: Sharing,
        requested: AccessMode,
    },
    #[error("volume {volume} is MULTI_NODE_SINGLE_WRITER and node {writer} already writes to it; publish further nodes with readonly=true")]
    SingleWriter { volume: VolumeId, writer: NodeId },
    #[error("volume {volume} was unpublished from node {node}, but the storage target has not confirmed that node is cut off; no other node is attached until it is (the fence is retried; check the storage host and the controller log)")]
    Unfenced { volume: VolumeId, node: NodeId },
    #[error("volume {volume} is single-node but the cluster shows it attached to {nodes}; no new publish is accepted until all but one of those VolumeAttachments are deleted (check which node really runs the workload)")]
    RwoConflict { volume: VolumeId, nodes: String },
}

fn describe(access: &Option<StoredCapability>, readonly: bool) -> String {
    let ro = if readonly { ", readonly" } else { "" };
    match access {
        Some(a) => format!(
            "{:?} {}{ro}",
            a.mode,
            if a.block { "block" } else { "mount" }
        ),
        None => format!("(unrecorded mode){ro}"),
    }
}

fn holder_list(state: &AttachmentState) -> String {
    state
        .node_ids()
        .map(NodeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn decide_publish(
    state: &AttachmentState,
    req: &PublishRequest,
    ctx: &PublishContext,
) -> Result<PublishDecision, PublishRefusal> {
    if let Some(i) = state.position(&req.node_id) {
        return republish(state, i, req, ctx.now);
    }
    let volume = || state.volume_id.clone();
    // A leaving node whose Node is gone is cleared below instead (after its fence).
    if let Some(node) = state.unfenced().find(|n| !ctx.gone_nodes.contains(n)) {
        return Err(PublishRefusal::Unfenced {
            volume: volume(),
            node: node.clone(),
        });
    }
    if state.conflict && !state.nodes.is_empty() {
        return Err(PublishRefusal::RwoConflict {
            volume: volume(),
            nodes: holder_list(state),
        });
    }
    let requested = req.access.mode.sharing();
    if !state.nodes.is_empty() && requested != state.sharing {
        return Err(PublishRefusal::ModeMismatch {
            volume: volume(),
            holders: holder_list(state),
            attached: state.sharing,
            requested: req.access.mode,
        });
    }
    // MULTI_NODE_SINGLE_WRITER: one writer, any other node read-only.
    let single_writer = |a: &NodeAttachment| {
        a.access
            .is_some_and(|c| c.mode == AccessMode::MultiNodeSingleWriter)
    };
    let writer = state.nodes.iter().find(|a| {
        !a.readonly && (single_writer(a) || req.access.mode == AccessMode::MultiNodeSingleWriter)
    });
    if let (Some(w), false) = (writer, req.readonly) {
        return Err(PublishRefusal::SingleWriter {
            volume: volume(),
            writer: w.node_id.clone(),
        });
    }
    let adjusted: std::borrow::Cow<'_, AttachmentState> =
        if state.nodes.is_empty() && state.sharing != requested {
            // Nothing attached: the next holder's mode decides (a release record stays).
            let mut s = state.clone();
            s.sharing = requested;
            std::borrow::Cow::Owned(s)
        } else {
            std::borrow::Cow::Borrowed(state)
        };
    let state = adjusted.as_ref();
    if state.sharing == Sharing::Rox && !req.readonly {
        return Err(PublishRefusal::ReadOnlyRequired { volume: volume() });
    }
    let attach = |from: &AttachmentState| {
        let mut next = from.clone();
        next.released = None;
        // Published again: it holds a new attachment, no longer a fenced one.
        next.fenced.retain(|f| f.node_id != req.node_id);
        next.nodes.push(NodeAttachment {
            node_id: req.node_id.clone(),
            attached_at: ctx.now,
            readonly: req.readonly,
            access: Some(req.access),
            fencing: false,
        });
        next
    };
    match (state.sharing, state.nodes.as_slice()) {
        (_, []) => match state.recent_release(ctx.now, ctx.grace) {
            Some(r) if r.node_id != req.node_id => Ok(PublishDecision::HandedOff {
                from: r.node_id.clone(),
                next: attach(state),
            }),
            _ => Ok(PublishDecision::Attached(attach(state))),
        },
        (Sharing::Rox, _) => Ok(PublishDecision::Attached(attach(state))),
        (Sharing::Rwo, [holder, ..]) if ctx.gone_nodes.contains(&holder.node_id) => {
            let mut cleared = state.clone();
            cleared.nodes.clear();
            Ok(PublishDecision::StaleHolderCleared {
                holder: holder.node_id.clone(),
                next: attach(&cleared),
            })
        }
        (Sharing::Rwo, [holder, ..]) => Err(PublishRefusal::HeldElsewhere {
            volume: state.volume_id.clone(),
            holder: holder.node_id.clone(),
        }),
        (Sharing::Rwx, [holder]) if !ctx.workload.foreign_pods.is_empty() => {
            Err(PublishRefusal::SharedWithOtherWorkloads {
                volume: state.volume_id.clone(),
                holder: holder.node_id.clone(),
                pods: ctx.workload.foreign_pods.clone(),
            })
        }
        (Sharing::Rwx, [_]) => {
            let mut next = attach(state);
            next.clear_migration();
            next.migration_started_at = Some(ctx.now);
            next.migration = ctx.workload.migration.clone();
            let (timeout, basis) = match &ctx.workload.vmi {
                Some(clock) => (clock.timeout_from(ctx.now), clock.basis.clone()),
                None => (ctx.migration_timeout, DeadlineBasis::StorageClass),
            };
            next.migration_timeout_secs = timeout.as_secs();
            next.deadline_basis = Some(basis);
            Ok(PublishDecision::MigrationStarted(next))
        }
        (Sharing::Rwx, [source, target, ..]) => {
            let (volume, source_node, target) = (
                state.volume_id.clone(),
                source.node_id.clone(),
                target.node_id.clone(),
            );
            match state.migration_started_at {
                Some(started) if state.past_deadline(ctx.now) => {
                    Err(PublishRefusal::MigrationTimedOut {
                        volume,
                        source_node,
                        target,
                        started,
                        timeout_secs: state.migration_timeout_secs,
                    })
                }
                _ => Err(PublishRefusal::MigrationLimit {
                    volume,
                    source_node,
                    target,
                }),
            }
        }
    }
}

/// A publish to a node that already holds the volume: idempotent only for the same
/// request (CSI: same volume, node and capability; otherwise ALREADY_EXISTS).
fn republish(
    state: &AttachmentState,
    i: usize,
    req: &PublishRequest,
    now: DateTime<Utc>,
) -> Result<PublishDecision, PublishRefusal> {
    let existing = &state.nodes[i];
    // Beyond what the mode allows (the cluster showed more holders than the store
    // admitted): never granted again, whatever the object says.
    if state.conflict && i >= state.sharing.max_nodes() {
        return Err(PublishRefusal::RwoConflict {
            volume: state.volume_id.clone(),
            nodes: holder_list(state),
        });
    }
    if existing.readonly != req.readonly {
        return Err(PublishRefusal::ReadonlyMismatch {
            volume: state.volume_id.clone(),
            node: req.node_id.clone(),
            existing: existing.readonly,
            requested: req.readonly,
        });
    }
    // A record without the mode (written before it was kept) is taken at its word.
    if existing.access.is_some_and(|a| a != req.access) {
        return Err(PublishRefusal::PublishedDifferently {
            volume: state.volume_id.clone(),
            node: req.node_id.clone(),
            existing: describe(&existing.access, existing.readonly),
            requested: describe(&Some(req.access), req.readonly),
        });
    }
    if !existing.fencing {
        return Ok(PublishDecision::AlreadyAttached);
    }
    // A new attachment: the old one may already be fenced at a target that remembers
    // it (NBD), so it gets a new identity (and with it a new export secret).
    let mut next = state.clone();
    next.nodes[i].fencing = false;
    next.nodes[i].attached_at = now;
    Ok(PublishDecision::Reclaimed(next))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnpublishDecision {
    /// The node did not hold the volume: idempotent success, nothing to persist.
    NotAttached,
    /// The node was removed; no migration was involved.
    Detached(AttachmentState),
    /// One side of a live migration left; the other is now the sole primary.
    MigrationEnded {
        next: AttachmentState,
        ended: EndedMigration,
    },
}

/// A migration that just ended, as far as the attachments tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedMigration {
    pub source: NodeId,
    pub target: NodeId,
    pub started: Option<DateTime<Utc>>,
    pub migration: Option<MigrationRef>,
    /// The source left (the target carries on): what detach order says.
    pub source_left: bool,
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationOutcome {
    Completed,
    Aborted,
    Failed,
}

impl MigrationOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationOutcome::Completed => "completed",
            MigrationOutcome::Aborted => "aborted",
            MigrationOutcome::Failed => "failed",
        }
    }
}

/// A VirtualMachineInstanceMigration's phase, reduced to what decides an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Not finished (Pending … Running), whatever the exact phase.
    Running(String),
    Succeeded,
    /// Failed; `aborted` when KubeVirt ended it on request (cancel, VMIM deleted).
    Failed {
        aborted: bool,
    },
}

/// The outcome and what it rests on: the migration object's phase when it has one that
/// is final, the order of detaches otherwise.
pub fn migration_outcome(
    ended: &EndedMigration,
    phase: Option<&MigrationPhase>,
) -> (MigrationOutcome, String) {
    match phase {
        Some(MigrationPhase::Succeeded) => (
            MigrationOutcome::Completed,
            "VirtualMachineInstanceMigration phase Succeeded".into(),
        ),
        Some(MigrationPhase::Failed { aborted: true }) => (
            MigrationOutcome::Aborted,
            "VirtualMachineInstanceMigration aborted on request".into(),
        ),
        Some(MigrationPhase::Failed { aborted: false }) => (
            MigrationOutcome::Failed,
            "VirtualMachineInstanceMigration phase Failed".into(),
        ),
        Some(MigrationPhase::Running(_)) | None => {
            let outcome = if ended.source_left {
                MigrationOutcome::Completed
            } else {
                MigrationOutcome::Aborted
            };
            let basis = match phase {
                Some(MigrationPhase::Running(p)) => {
                    format!("detach order (VirtualMachineInstanceMigration still {p})")
                }
                _ => "detach order".into(),
            };
            (outcome, basis)
        }
    }
}

pub fn decide_unpublish(
    state: &AttachmentState,
    node: &NodeId,
    now: DateTime<Utc>,
    grace: Duration,
) -> UnpublishDecision {
    let Some(i) = state.position(node) else {
        return UnpublishDecision::NotAttached;
    };
    let mut next = state.clone();
    next.nodes.remove(i);
    if next.nodes.len() <= next.sharing.max_nodes() {
        next.conflict = false;
    }
    let migrating = state.sharing == Sharing::Rwx && state.nodes.len() == 2;
    if migrating {
        let ended = EndedMigration {
            source: state.nodes[0].node_id.clone(),
            target: state.nodes[1].node_id.clone(),
            started: state.migration_started_at,
            migration: state.migration.clone(),
            source_left: i == 0,
        };
        next.clear_migration();
        return UnpublishDecision::MigrationEnded { next, ended };
    }
    if state.sharing == Sharing::Rwo && next.nodes.is_empty() && !grace.is_zero() {
        next.released = Some(Released {
            node_id: node.clone(),
            detached_at: now,
        });
    }
    UnpublishDecision::Detached(next)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn state(sharing: Sharing, nodes: &[&str]) -> AttachmentState {
        let mut s = AttachmentState::new(VolumeId::generate(), sharing, DEFAULT_MIGRATION_TIMEOUT);
        for n in nodes {
            s.nodes.push(NodeAttachment {
                node_id: node(n),
                attached_at: Utc::now(),
                readonly: sharing == Sharing::Rox,
                access: None,
                fencing: false,
            });
        }
        if sharing == Sharing::Rwx && nodes.len() == 2 {
            s.migration_started_at = Some(Utc::now());
        }
        s
    }

    fn ctx() -> PublishContext {
        PublishContext {
            now: Utc::now(),
            grace: GRACE,
            migration_timeout: DEFAULT_MIGRATION_TIMEOUT,
            ..PublishContext::default()
        }
    }

    /// The capability a volume of `sharing` is published with in these tests.
    pub(crate) fn access_for(sharing: Sharing) -> StoredCapability {
        let mode = match sharing {
            Sharing::Rwo => AccessMode::SingleNodeWriter,
            Sharing::Rwx => AccessMode::MultiNodeMultiWriter,
            Sharing::Rox => AccessMode::MultiNodeReaderOnly,
        };
        StoredCapability { mode, block: true }
    }

    fn vmim(name: &str) -> MigrationRef {
        MigrationRef {
            namespace: "vms".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            vmi: "vm1".into(),
        }
    }

    fn publish_with(
        s: &AttachmentState,
        n: &str,
        readonly: bool,
        ctx: &PublishContext,
    ) -> Result<PublishDecision, PublishRefusal> {
        decide_publish(
            s,
            &PublishRequest {
                node_id: node(n),
                readonly,
                access: access_for(s.sharing),
            },
            ctx,
        )
    }

    fn publish(
        s: &AttachmentState,
        n: &str,
        readonly: bool,
    ) -> Result<PublishDecision, PublishRefusal> {
        publish_with(s, n, readonly, &ctx())
    }

    #[test]
    fn first_publish_attaches_as_primary() {
        for sharing in [Sharing::Rwo, Sharing::Rwx, Sharing::Rox] {
            let PublishDecision::Attached(next) =
                publish(&state(sharing, &[]), "a", sharing == Sharing::Rox).unwrap()
            else {
                panic!("expected Attached");
            };
            assert_eq!(next.node_ids().collect::<Vec<_>>(), [&node("a")]);
            assert!(next.migration_started_at.is_none());
        }
    }

    #[test]
    fn republish_to_same_node_is_idempotent() {
        for sharing in [Sharing::Rwo, Sharing::Rwx] {
            assert_eq!(
                publish(&state(sharing, &["a"]), "a", false).unwrap(),
                PublishDecision::AlreadyAttached
            );
        }
        assert_eq!(
            publish(&state(Sharing::Rwx, &["a", "b"]), "b", false).unwrap(),
            PublishDecision::AlreadyAttached
        );
        assert_eq!(
            publish(&state(Sharing::Rox, &["a", "b"]), "b", true).unwrap(),
            PublishDecision::AlreadyAttached
        );
        assert!(matches!(
            publish(&state(Sharing::Rwo, &["a"]), "a", true),
            Err(PublishRefusal::ReadonlyMismatch { .. })
        ));
    }

    fn publish_as(
        s: &AttachmentState,
        n: &str,
        mode: AccessMode,
        block: bool,
        readonly: bool,
    ) -> Result<PublishDecision, PublishRefusal> {
        decide_publish(
            s,
            &PublishRequest {
                node_id: node(n),
                readonly,
                access: StoredCapability { mode, block },
            },
            &ctx(),
        )
    }

    /// Issue 15 case 7: idempotency is by capability, not by node alone.
    #[test]
    fn republish_with_another_capability_is_already_exists() {
        let PublishDecision::Attached(rwx) = publish_as(
            &state(Sharing::Rwx, &[]),
            "a",
            AccessMode::MultiNodeMultiWriter,
            true,
            false,
        )
        .unwrap() else {
            panic!("expected Attached")
        };
        // Same node, same capability: idempotent.
        assert_eq!(
            publish_as(&rwx, "a", AccessMode::MultiNodeMultiWriter, true, false).unwrap(),
            PublishDecision::AlreadyAttached
        );
        // Same node, another mode or access type: ALREADY_EXISTS.
        let err = publish_as(&rwx, "a", AccessMode::SingleNodeWriter, true, false).unwrap_err();
        assert!(
            matches!(err, PublishRefusal::PublishedDifferently { .. }),
            "{err}"
        );
        let err =
            publish_as(&rwx, "a", AccessMode::MultiNodeMultiWriter, false, false).unwrap_err();
        assert!(
            matches!(err, PublishRefusal::PublishedDifferently { .. }),
            "{err}"
        );
        // Another node with a mode contradicting the attached one: refused, and the
        // state's mode is never widened or narrowed by it.
        let err = publish_as(&rwx, "b", AccessMode::SingleNodeWriter, true, false).unwrap_err();
        assert!(matches!(err, PublishRefusal::ModeMismatch { .. }), "{err}");
        let PublishDecision::Attached(rwo) = publish_as(
            &state(Sharing::Rwo, &[]),
            "a",
            AccessMode::SingleNodeWriter,
            true,
            false,
        )
        .unwrap() else {
            panic!("expected Attached")
        };
        let err = publish_as(&rwo, "b", AccessMode::MultiNodeMultiWriter, true, false).unwrap_err();
        assert!(matches!(err, PublishRefusal::ModeMismatch { .. }), "{err}");
    }

    #[test]
    fn multi_node_single_writer_admits_one_writer() {
        let mnsw = AccessMode::MultiNodeSingleWriter;
        let PublishDecision::Attached(one) =
            publish_as(&state(Sharing::Rwx, &[]), "a", mnsw, true, false).unwrap()
        else {
            panic!("expected Attached")
        };
        let err = publish_as(&one, "b", mnsw, true, false).unwrap_err();
        assert!(
            matches!(&err, PublishRefusal::SingleWriter { writer, .. } if writer == &node("a")),
            "{err}"
        );
        assert!(matches!(
            publish_as(&one, "b", mnsw, true, true),
            Ok(PublishDecision::MigrationStarted(_))
        ));
    }

    #[test]
    fn an_unfenced_holder_blocks_every_other_node_but_not_its_own_retry() {
        let mut s = state(Sharing::Rwx, &["a"]);
        s.mark_fencing(&node("a"));
        let err = publish(&s, "b", false).unwrap_err();
        assert!(
            matches!(&err, PublishRefusal::Unfenced { node: n, .. } if n == &node("a")),
            "{err}"
        );
        let PublishDecision::Reclaimed(next) = publish(&s, "a", false).unwrap() else {
            panic!("expected the holder to reclaim its slot")
        };
        assert!(!next.nodes[0].fencing);
        let mut rwo = state(Sharing::Rwo, &["a"]);
        rwo.mark_fencing(&node("a"));
        assert!(matches!(
            publish(&rwo, "b", false),
            Err(PublishRefusal::Unfenced { .. })
        ));
    }

    #[test]
    fn a_cluster_conflict_refuses_new_nodes() {
        let mut s = state(Sharing::Rwo, &["a", "b"]);
        s.conflict = true;
        assert!(matches!(
            publish(&s, "c", false),
            Err(PublishRefusal::RwoConflict { .. })
        ));
    }

    #[test]
    fn rwo_elsewhere_is_refused_naming_the_holder() {
        let err = publish(&state(Sharing::Rwo, &["a"]), "b", false).unwrap_err();
        assert!(
            matches!(&err, PublishRefusal::HeldElsewhere { holder, .. } if holder == &node("a"))
        );
        assert!(err.to_string().contains("RWX"), "{err}");
        assert!(err.to_string().contains("node a"), "{err}");
    }

    #[test]
    fn rwo_within_grace_after_detach_hands_off() {
        let s = state(Sharing::Rwo, &["a"]);
        let UnpublishDecision::Detached(released) =
            decide_unpublish(&s, &node("a"), Utc::now(), GRACE)
        else {
            panic!("expected Detached");
        };
        assert!(released.nodes.is_empty());
        assert_eq!(released.released.as_ref().unwrap().node_id, node("a"));
        assert!(!released.is_idle(Utc::now(), GRACE));

        let PublishDecision::HandedOff { from, next } = publish(&released, "b", false).unwrap()
        else {
            panic!("expected a hand-off");
        };
        assert_eq!(from, node("a"));
        assert_eq!(
            next.node_ids().collect::<Vec<_>>(),
            [&node("b")],
            "never two RWO nodes"
        );
        assert!(next.released.is_none());

        // The same node coming back is a plain re-attach, not a hand-off.
        assert!(matches!(
            publish(&released, "a", false).unwrap(),
            PublishDecision::Attached(_)
        ));

        // After the grace period the record is idle and a new node simply attaches.
        let later = PublishContext {
            now: Utc::now() + chrono::Duration::seconds(31),
            ..ctx()
        };
        assert!(released.is_idle(later.now, GRACE));
        assert!(matches!(
            publish_with(&released, "b", false, &later).unwrap(),
            PublishDecision::Attached(_)
        ));
    }

    #[test]
    fn zero_grace_disables_the_release_record() {
        let s = state(Sharing::Rwo, &["a"]);
        let UnpublishDecision::Detached(next) =
            decide_unpublish(&s, &node("a"), Utc::now(), Duration::ZERO)
        else {
            panic!("expected Detached");
        };
        assert!(next.released.is_none());
        assert!(next.is_idle(Utc::now(), Duration::ZERO));
    }

    #[test]
    fn rwo_holder_whose_node_is_gone_is_cleared() {
        let s = state(Sharing::Rwo, &["a"]);
        let gone = PublishContext {
            gone_nodes: vec![node("a")],
            ..ctx()
        };
        let PublishDecision::StaleHolderCleared { holder, next } =
            publish_with(&s, "b", false, &gone).unwrap()
        else {
            panic!("expected the stale holder to be cleared");
        };
        assert_eq!(holder, node("a"));
        assert_eq!(next.node_ids().collect::<Vec<_>>(), [&node("b")]);
        // A gone node that is not the holder changes nothing.
        let other = PublishContext {
            gone_nodes: vec![node("z")],
            ..ctx()
        };
        assert!(publish_with(&s, "b", false, &other).is_err());
    }

    #[test]
    fn rwx_second_node_starts_a_migration_third_is_refused() {
        let PublishDecision::MigrationStarted(next) =
            publish(&state(Sharing::Rwx, &["a"]), "b", false).unwrap()
        else {
            panic!("expected MigrationStarted");
        };
        assert_eq!(
            next.node_ids().collect::<Vec<_>>(),
            [&node("a"), &node("b")]
        );
        assert!(next.migration_started_at.is_some());
        let err = publish(&next, "c", false).unwrap_err();
        assert!(matches!(err, PublishRefusal::MigrationLimit { .. }));
        assert!(err.to_string().contains("migration limit"), "{err}");
        assert!(err.to_string().contains(" a and b"), "{err}");
    }

    #[test]
    fn rwx_after_timeout_refuses_with_reset_instructions_but_keeps_both() {
        let mut s = state(Sharing::Rwx, &["a", "b"]);
        s.migration_timeout_secs = 30;
        s.migration_started_at = Some(Utc::now() - chrono::Duration::seconds(31));
        assert!(s.past_deadline(Utc::now()));
        let err = publish(&s, "c", false).unwrap_err();
        assert!(
            matches!(err, PublishRefusal::MigrationTimedOut { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("detached"), "{err}");
        // Both holders still get OK on retries: access is never revoked.
        assert_eq!(
            publish(&s, "a", false).unwrap(),
            PublishDecision::AlreadyAttached
        );
        assert_eq!(
            publish(&s, "b", false).unwrap(),
            PublishDecision::AlreadyAttached
        );
        // Recovery: detaching one side resets the migration.
        let UnpublishDecision::MigrationEnded { next, ended } =
            decide_unpublish(&s, &node("b"), Utc::now(), GRACE)
        else {
            panic!("expected the migration to end");
        };
        assert!(!ended.source_left);
        assert!(!next.past_deadline(Utc::now()));
        assert!(matches!(
            publish(&next, "c", false).unwrap(),
            PublishDecision::MigrationStarted(_)
        ));
    }

    #[test]
    fn rox_takes_any_number_of_readonly_nodes() {
        let s = state(Sharing::Rox, &["a", "b", "c"]);
        assert!(matches!(
            publish(&s, "d", true),
            Ok(PublishDecision::Attached(_))
        ));
        assert!(matches!(
            publish(&s, "d", false),
            Err(PublishRefusal::ReadOnlyRequired { .. })
        ));
    }

    #[test]
    fn readonly_publish_of_rwo_is_recorded() {
        let PublishDecision::Attached(next) =
            publish(&state(Sharing::Rwo, &[]), "a", true).unwrap()
        else {
            panic!("expected Attached");
        };
        assert!(next.nodes[0].readonly);
    }

    #[test]
    fn unpublish_source_completes_migration_target_aborts_it() {
        let mut s = state(Sharing::Rwx, &["a", "b"]);
        s.migration = Some(vmim("mig-1"));
        let UnpublishDecision::MigrationEnded { next, ended } =
            decide_unpublish(&s, &node("a"), Utc::now(), GRACE)
        else {
            panic!("expected the migration to end");
        };
        assert!(ended.source_left);
        assert_eq!((ended.source.as_str(), ended.target.as_str()), ("a", "b"));
        assert_eq!(ended.started, s.migration_started_at);
        assert_eq!(ended.migration, Some(vmim("mig-1")));
        assert_eq!(next.node_ids().collect::<Vec<_>>(), [&node("b")]);
        assert!(next.migration_started_at.is_none() && next.migration.is_none());
        assert_eq!(
            migration_outcome(&ended, None).0,
            MigrationOutcome::Completed
        );
        let UnpublishDecision::MigrationEnded { next, ended } =
            decide_unpublish(&s, &node("b"), Utc::now(), GRACE)
        else {
            panic!("expected the migration to end");
        };
        assert!(!ended.source_left);
        assert_eq!(next.node_ids().collect::<Vec<_>>(), [&node("a")]);
        assert!(next.migration_started_at.is_none());
        assert_eq!(migration_outcome(&ended, None).0, MigrationOutcome::Aborted);
    }

    #[test]
    fn the_migration_phase_decides_the_outcome_when_final() {
        let ended = |source_left| EndedMigration {
            source: node("a"),
            target: node("b"),
            started: None,
            migration: Some(vmim("m")),
            source_left,
        };
        let failed = MigrationPhase::Failed { aborted: false };
        let aborted = MigrationPhase::Failed { aborted: true };
        let running = MigrationPhase::Running("TargetReady".into());
        for (source_left, phase, want) in [
            (
                true,
                Some(&MigrationPhase::Succeeded),
                MigrationOutcome::Completed,
            ),
            (false, Some(&failed), MigrationOutcome::Failed),
            // Failed after the hand-off: the phase says failed although the source left.
            (true, Some(&failed), MigrationOutcome::Failed),
            (false, Some(&aborted), MigrationOutcome::Aborted),
            (true, Some(&running), MigrationOutcome::Completed),
            (false, Some(&running), MigrationOutcome::Aborted),
            (false, None, MigrationOutcome::Aborted),
        ] {
            let (outcome, basis) = migration_outcome(&ended(source_left), phase);
            assert_eq!(
                outcome, want,
                "{phase:?} source_left={source_left}: {basis}"
            );
        }
        assert!(migration_outcome(&ended(true), Some(&running))
            .1
            .contains("still TargetReady"));
    }

    #[test]
    fn second_attach_uses_the_vmi_deadline_and_records_the_migration() {
        let basis = DeadlineBasis::Kubevirt {
            vmi: "vm1".into(),
            data_gb: 3,
            per_gib_secs: 150,
            startup_secs: 900,
            running_since: None,
            configured: false,
            switch: None,
        };
        let c = PublishContext {
            migration_timeout: Duration::from_secs(300),
            workload: Workload {
                foreign_pods: vec![],
                vmi: Some(MigrationClock {
                    running_since: None,
                    completion: Duration::from_secs(450),
                    pending_allowance: Duration::from_secs(900),
                    basis: basis.clone(),
                }),
                migration: Some(vmim("mig-7")),
            },
            ..ctx()
        };
        let PublishDecision::MigrationStarted(next) =
            publish_with(&state(Sharing::Rwx, &["a"]), "b", false, &c).unwrap()
        else {
            panic!("expected MigrationStarted");
        };
        assert_eq!(next.migration_timeout_secs, 1350);
        assert_eq!(next.deadline_basis, Some(basis));
        assert_eq!(next.migration, Some(vmim("mig-7")));
        // Without a VMI the StorageClass timeout applies, whatever an earlier migration used.
        let mut earlier = state(Sharing::Rwx, &["a"]);
        earlier.migration_timeout_secs = 1350;
        let c = PublishContext {
            migration_timeout: Duration::from_secs(600),
            ..ctx()
        };
        let PublishDecision::MigrationStarted(next) =
            publish_with(&earlier, "b", false, &c).unwrap()
        else {
            panic!("expected MigrationStarted");
        };
        assert_eq!(next.migration_timeout_secs, 600);
        assert_eq!(next.deadline_basis, Some(DeadlineBasis::StorageClass));
        assert!(next.migration.is_none());
    }

    #[test]
    fn second_attach_is_refused_while_other_workloads_use_the_claim() {
        let c = PublishContext {
            workload: Workload {
                foreign_pods: vec!["vms/other-pod (VM other)".into()],
                ..Workload::default()
            },
            ..ctx()
        };
        let s = state(Sharing::Rwx, &["a"]);
        let err = publish_with(&s, "b", false, &c).unwrap_err();
        assert!(
            matches!(&err, PublishRefusal::SharedWithOtherWorkloads { pods, .. } if pods.len() == 1)
        );
        let text = err.to_string();
        assert!(
            text.contains("vms/other-pod") && text.contains("--allow-rwx-block-sharing"),
            "{text}"
        );
        // The holder's own retries are never refused.
        assert_eq!(
            publish_with(&s, "a", false, &c).unwrap(),
            PublishDecision::AlreadyAttached
        );
    }

    #[test]
    fn unpublish_unknown_node_is_a_no_op() {
        assert_eq!(
            decide_unpublish(&state(Sharing::Rwo, &["a"]), &node("x"), Utc::now(), GRACE),
            UnpublishDecision::NotAttached
        );
        let UnpublishDecision::Detached(next) =
            decide_unpublish(&state(Sharing::Rwx, &["a"]), &node("a"), Utc::now(), GRACE)
        else {
            panic!("expected Detached");
        };
        assert!(next.nodes.is_empty());
        assert!(next.released.is_none(), "only RWO keeps a release record");
    }

    #[test]
    fn fenced_nodes_are_bounded_and_forgotten_on_republish() {
        let mut s = state(Sharing::Rwx, &["b"]);
        for n in ["a", "c", "d", "e", "f", "a"] {
            s.record_fence(&node(n), Utc::now(), Fencing::Target);
        }
        let fenced: Vec<&str> = s.fenced.iter().map(|f| f.node_id.as_str()).collect();
        assert_eq!(fenced, ["d", "e", "f", "a"]);
        let PublishDecision::MigrationStarted(next) = publish(&s, "a", false).unwrap() else {
            panic!("expected a migration");
        };
        assert!(next.fenced.iter().all(|f| f.node_id != node("a")));
        assert_eq!(next.fenced.len(), 3);
    }

    #[test]
    fn state_serialises_with_order_and_timestamps() {
        let s = state(Sharing::Rwx, &["b", "a"]);
        let json = serde_json::to_string(&s).unwrap();
        let back: AttachmentState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // Records written before a field existed still load.
        let old = format!(
            r#"{{"volume_id":"{}","sharing":"Rwo","nodes":[]}}"#,
            s.volume_id
        );
        let loaded: AttachmentState = serde_json::from_str(&old).unwrap();
        assert_eq!(loaded.migration_timeout_secs, 300);
        // The overdue flag's earlier name still loads.
        let old = format!(
            r#"{{"volume_id":"{}","sharing":"Rwx","nodes":[],"migration_timed_out":true}}"#,
            s.volume_id
        );
        let loaded: AttachmentState = serde_json::from_str(&old).unwrap();
        assert!(loaded.migration_overdue);
    }
}
