//! Attachment state and the pure publish/unpublish decisions over it. No I/O here:
//! every rule is a function of (state, request, now), tested exhaustively below.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAttachment {
    pub node_id: NodeId,
    pub attached_at: DateTime<Utc>,
    #[serde(default)]
    pub readonly: bool,
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
}

impl AttachmentState {
    pub fn new(volume_id: VolumeId, sharing: Sharing) -> Self {
        AttachmentState {
            volume_id,
            sharing,
            nodes: Vec::new(),
            migration_started_at: None,
        }
    }

    pub fn node_ids(&self) -> impl Iterator<Item = &NodeId> {
        self.nodes.iter().map(|n| &n.node_id)
    }

    fn position(&self, node: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| &n.node_id == node)
    }
}

/// A ControllerPublishVolume, reduced to what the rules look at.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub node_id: NodeId,
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishDecision {
    /// Already attached to this node with the same readonly flag: nothing to persist.
    AlreadyAttached,
    /// Attached as the first (primary) node.
    Attached(AttachmentState),
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
    now: DateTime<Utc>,
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
    let attach = |mut next: AttachmentState| {
        next.nodes.push(NodeAttachment {
            node_id: req.node_id.clone(),
            attached_at: now,
            readonly: req.readonly,
        });
        next
    };
    match (state.sharing, state.nodes.as_slice()) {
        (_, []) => Ok(PublishDecision::Attached(attach(state.clone()))),
        (Sharing::Rox, _) => Ok(PublishDecision::Attached(attach(state.clone()))),
        (Sharing::Rwo, [holder, ..]) => Err(PublishRefusal::HeldElsewhere {
            volume: state.volume_id.clone(),
            holder: holder.node_id.clone(),
        }),
        (Sharing::Rwx, [_]) => {
            let mut next = attach(state.clone());
            next.migration_started_at = Some(now);
            Ok(PublishDecision::MigrationStarted(next))
        }
        (Sharing::Rwx, [source, target, ..]) => Err(PublishRefusal::MigrationLimit {
            volume: state.volume_id.clone(),
            source_node: source.node_id.clone(),
            target: target.node_id.clone(),
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnpublishDecision {
    /// The node did not hold the volume: idempotent success, nothing to persist.
    NotAttached,
    /// The node was removed; no migration was involved.
    Detached(AttachmentState),
    /// The migration source left: the target is now the sole primary.
    MigrationCompleted(AttachmentState),
    /// The migration target left before the source: the source stays primary.
    MigrationAborted(AttachmentState),
}

pub fn decide_unpublish(state: &AttachmentState, node: &NodeId) -> UnpublishDecision {
    let Some(i) = state.position(node) else {
        return UnpublishDecision::NotAttached;
    };
    let mut next = state.clone();
    next.nodes.remove(i);
    let migrating = state.migration_started_at.is_some() && state.sharing == Sharing::Rwx;
    if !migrating || next.nodes.len() != 1 {
        return UnpublishDecision::Detached(next);
    }
    next.migration_started_at = None;
    if i == 0 {
        UnpublishDecision::MigrationCompleted(next)
    } else {
        UnpublishDecision::MigrationAborted(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn state(sharing: Sharing, nodes: &[&str]) -> AttachmentState {
        let mut s = AttachmentState::new(VolumeId::generate(), sharing);
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

    fn publish(
        s: &AttachmentState,
        n: &str,
        readonly: bool,
    ) -> Result<PublishDecision, PublishRefusal> {
        decide_publish(
            s,
            &PublishRequest {
                node_id: node(n),
                readonly,
            },
            Utc::now(),
        )
    }

    #[test]
    fn first_publish_attaches_as_primary() {
        for sharing in [Sharing::Rwo, Sharing::Rwx] {
            let PublishDecision::Attached(next) =
                publish(&state(sharing, &[]), "a", false).unwrap()
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
        assert!(err.to_string().contains("migration limit"), "{err}");
        assert!(err.to_string().contains(" a and b"), "{err}");
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
        let UnpublishDecision::MigrationCompleted(done) = decide_unpublish(&s, &node("a")) else {
            panic!("expected completion");
        };
        assert_eq!(done.node_ids().collect::<Vec<_>>(), [&node("b")]);
        assert!(done.migration_started_at.is_none());
        let UnpublishDecision::MigrationAborted(aborted) = decide_unpublish(&s, &node("b")) else {
            panic!("expected abort");
        };
        assert_eq!(aborted.node_ids().collect::<Vec<_>>(), [&node("a")]);
        assert!(aborted.migration_started_at.is_none());
    }

    #[test]
    fn unpublish_unknown_node_is_a_no_op() {
        assert_eq!(
            decide_unpublish(&state(Sharing::Rwo, &["a"]), &node("x")),
            UnpublishDecision::NotAttached
        );
        let UnpublishDecision::Detached(next) =
            decide_unpublish(&state(Sharing::Rwo, &["a"]), &node("a"))
        else {
            panic!("expected Detached");
        };
        assert!(next.nodes.is_empty());
    }
}
