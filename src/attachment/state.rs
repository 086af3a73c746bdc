//! Attachment state and the pure publish/unpublish decisions over it. No I/O here:
//! every rule is a function of (state, request, context), tested exhaustively below.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};

pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAttachment {
    pub node_id: NodeId,
    pub attached_at: DateTime<Utc>,
    #[serde(default)]
    pub readonly: bool,
}

/// The last RWO holder, kept for the grace period after its detach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub node_id: NodeId,
    pub detached_at: DateTime<Utc>,
}

fn default_timeout_secs() -> u64 {
    DEFAULT_MIGRATION_TIMEOUT.as_secs()
}

/// Which nodes hold a volume, in order: index 0 is the primary, index 1 the target of a
/// live migration (RWX block only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentState {
    pub volume_id: VolumeId,
    pub sharing: Sharing,
    pub nodes: Vec<NodeAttachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_started_at: Option<DateTime<Utc>>,
    #[serde(default = "default_timeout_secs")]
    pub migration_timeout_secs: u64,
    /// Set once the running migration passed its deadline and that was reported.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migration_timed_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Released>,
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
            migration_timed_out: false,
            released: None,
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

    pub fn migration_overdue(&self, now: DateTime<Utc>) -> bool {
        self.nodes.len() == 2 && self.migration_deadline().is_some_and(|d| now > d)
    }

    /// A released holder still within the grace period.
    fn recent_release(&self, now: DateTime<Utc>, grace: Duration) -> Option<&Released> {
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        self.released
            .as_ref()
            .filter(|r| now <= r.detached_at + grace)
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
}

/// Facts from outside the state that the rules need.
#[derive(Debug, Clone, Default)]
pub struct PublishContext {
    pub now: DateTime<Utc>,
    pub grace: Duration,
    /// Holders whose Node object no longer exists (only known with Kubernetes).
    pub gone_nodes: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishDecision {
    /// Already attached to this node with the same readonly flag: nothing to persist.
    AlreadyAttached,
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
    #[error("migration of volume {volume} from {source_node} to {target} started at {started} and passed its {timeout_secs}s timeout; both nodes keep access, but no new node is attached until one side is detached (complete or cancel the VirtualMachineInstanceMigration, or delete the stuck target pod); raise migrationTimeoutSeconds for VMs with large memory")]
    MigrationTimedOut {
        volume: VolumeId,
        source_node: NodeId,
        target: NodeId,
        started: DateTime<Utc>,
        timeout_secs: u64,
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
}

pub fn decide_publish(
    state: &AttachmentState,
    req: &PublishRequest,
    ctx: &PublishContext,
) -> Result<PublishDecision, PublishRefusal> {
    if let Some(i) = state.position(&req.node_id) {
        let existing = state.nodes[i].readonly;
        return if existing == req.readonly {
            Ok(PublishDecision::AlreadyAttached)
        } else {
            Err(PublishRefusal::ReadonlyMismatch {
                volume: state.volume_id.clone(),
                node: req.node_id.clone(),
                existing,
                requested: req.readonly,
            })
        };
    }
    if state.sharing == Sharing::Rox && !req.readonly {
        return Err(PublishRefusal::ReadOnlyRequired {
            volume: state.volume_id.clone(),
        });
    }
    let attach = |from: &AttachmentState| {
        let mut next = from.clone();
        next.released = None;
        next.nodes.push(NodeAttachment {
            node_id: req.node_id.clone(),
            attached_at: ctx.now,
            readonly: req.readonly,
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
        (Sharing::Rwx, [_]) => {
            let mut next = attach(state);
            next.migration_started_at = Some(ctx.now);
            next.migration_timed_out = false;
            Ok(PublishDecision::MigrationStarted(next))
        }
        (Sharing::Rwx, [source, target, ..]) => {
            let (volume, source_node, target) = (
                state.volume_id.clone(),
                source.node_id.clone(),
                target.node_id.clone(),
            );
            match state.migration_started_at {
                Some(started) if state.migration_overdue(ctx.now) => {
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnpublishDecision {
    /// The node did not hold the volume: idempotent success, nothing to persist.
    NotAttached,
    /// The node was removed; no migration was involved.
    Detached(AttachmentState),
    /// The migration source left: the target is now the sole primary.
    MigrationCompleted {
        next: AttachmentState,
        started: Option<DateTime<Utc>>,
        target: NodeId,
    },
    /// The migration target left before the source: the source stays primary.
    MigrationAborted {
        next: AttachmentState,
        started: Option<DateTime<Utc>>,
        source_node: NodeId,
    },
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
    let migrating = state.sharing == Sharing::Rwx && state.nodes.len() == 2;
    if migrating {
        let started = next.migration_started_at.take();
        next.migration_timed_out = false;
        let remaining = next.nodes[0].node_id.clone();
        return if i == 0 {
            UnpublishDecision::MigrationCompleted {
                next,
                started,
                target: remaining,
            }
        } else {
            UnpublishDecision::MigrationAborted {
                next,
                started,
                source_node: remaining,
            }
        };
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
mod tests {
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
            gone_nodes: vec![],
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
        assert!(s.migration_overdue(Utc::now()));
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
        let UnpublishDecision::MigrationAborted { next, .. } =
            decide_unpublish(&s, &node("b"), Utc::now(), GRACE)
        else {
            panic!("expected abort");
        };
        assert!(!next.migration_overdue(Utc::now()));
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
        let s = state(Sharing::Rwx, &["a", "b"]);
        let UnpublishDecision::MigrationCompleted {
            next,
            started,
            target,
        } = decide_unpublish(&s, &node("a"), Utc::now(), GRACE)
        else {
            panic!("expected completion");
        };
        assert_eq!(target, node("b"));
        assert_eq!(started, s.migration_started_at);
        assert_eq!(next.node_ids().collect::<Vec<_>>(), [&node("b")]);
        assert!(next.migration_started_at.is_none());
        let UnpublishDecision::MigrationAborted {
            next, source_node, ..
        } = decide_unpublish(&s, &node("b"), Utc::now(), GRACE)
        else {
            panic!("expected abort");
        };
        assert_eq!(source_node, node("a"));
        assert_eq!(next.node_ids().collect::<Vec<_>>(), [&node("a")]);
        assert!(next.migration_started_at.is_none());
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
    }
}
