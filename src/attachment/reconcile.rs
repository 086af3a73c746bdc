//! The reconciler's decisions, pure like `decide_publish`: which holders may be cleared
//! (only on evidence), and what the state becomes once their fences are confirmed.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::state::{AttachmentState, EndedMigration};
use crate::capability::Sharing;
use crate::ids::NodeId;

/// What the cluster says about a volume's holders, as of this pass.
#[derive(Debug, Clone, Default)]
pub struct Evidence<'a> {
    /// Holders whose Node object is gone or out of service.
    pub gone_nodes: &'a [NodeId],
    /// The nodes a fresh read of VolumeAttachments shows for this volume; `None` when
    /// that read could not be made (nothing is cleared for a missing object then).
    pub va_nodes: Option<&'a [NodeId]>,
}

/// Holders to fence and clear: an unpublish whose fence is pending, a node that is gone,
/// or a holder older than `min_age` that no VolumeAttachment names any more.
pub fn reconcile_candidates(
    state: &AttachmentState,
    evidence: &Evidence<'_>,
    now: DateTime<Utc>,
    min_age: Duration,
) -> Vec<NodeId> {
    let old_enough = |at: DateTime<Utc>| (now - at).to_std().is_ok_and(|d| d >= min_age);
    state
        .nodes
        .iter()
        .filter(|a| {
            a.fencing
                || evidence.gone_nodes.contains(&a.node_id)
                || evidence
                    .va_nodes
                    .is_some_and(|va| !va.contains(&a.node_id) && old_enough(a.attached_at))
        })
        .map(|a| a.node_id.clone())
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileDecision {
    pub next: AttachmentState,
    /// A migration with one side cleared ends the way Kubernetes will take it.
    pub ended: Option<EndedMigration>,
    /// The running migration passed its deadline just now (reported once).
    pub overdue: bool,
}

/// The state once `cleared` (fenced, confirmed) holders are gone and `unfenced` ones are
/// marked as waiting for their fence.
pub fn decide_reconcile(
    state: &AttachmentState,
    cleared: &[NodeId],
    unfenced: &[NodeId],
    now: DateTime<Utc>,
) -> ReconcileDecision {
    let mut next = state.clone();
    next.nodes.retain(|a| !cleared.contains(&a.node_id));
    for node in unfenced {
        next.mark_fencing(node);
    }
    let ended = match (state.nodes.as_slice(), next.nodes.as_slice()) {
        ([source, target], [remaining]) if state.sharing == Sharing::Rwx => Some(EndedMigration {
            source: source.node_id.clone(),
            target: target.node_id.clone(),
            started: state.migration_started_at,
            migration: state.migration.clone(),
            source_left: remaining.node_id == target.node_id,
        }),
        _ => None,
    };
    if next.nodes.len() < 2 {
        next.clear_migration();
    }
    if next.nodes.len() <= next.sharing.max_nodes() {
        next.conflict = false;
    }
    let overdue = next.past_deadline(now) && !next.migration_overdue;
    if overdue {
        next.migration_overdue = true;
    }
    ReconcileDecision {
        next,
        ended,
        overdue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::state::{NodeAttachment, DEFAULT_MIGRATION_TIMEOUT};
    use crate::ids::VolumeId;

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn state(sharing: Sharing, nodes: &[&str], age_secs: i64) -> AttachmentState {
        let mut s = AttachmentState::new(VolumeId::generate(), sharing, DEFAULT_MIGRATION_TIMEOUT);
        for n in nodes {
            s.nodes.push(NodeAttachment {
                node_id: node(n),
                attached_at: Utc::now() - chrono::Duration::seconds(age_secs),
                readonly: false,
                access: None,
                fencing: false,
            });
        }
        if nodes.len() == 2 {
            s.migration_started_at = Some(Utc::now());
        }
        s
    }

    const AGE: Duration = Duration::from_secs(60);

    #[test]
    fn nothing_is_cleared_without_a_fresh_read() {
        let s = state(Sharing::Rwo, &["a"], 3600);
        let none = Evidence::default();
        assert!(reconcile_candidates(&s, &none, Utc::now(), AGE).is_empty());
        let va: Vec<NodeId> = vec![];
        let read = Evidence {
            va_nodes: Some(&va),
            ..Evidence::default()
        };
        assert_eq!(
            reconcile_candidates(&s, &read, Utc::now(), AGE),
            [node("a")]
        );
    }

    #[test]
    fn a_young_attachment_without_its_object_is_kept() {
        let s = state(Sharing::Rwo, &["a"], 1);
        let va: Vec<NodeId> = vec![];
        let read = Evidence {
            va_nodes: Some(&va),
            ..Evidence::default()
        };
        assert!(reconcile_candidates(&s, &read, Utc::now(), AGE).is_empty());
    }

    #[test]
    fn gone_nodes_and_pending_fences_are_candidates() {
        let mut s = state(Sharing::Rwx, &["a", "b"], 1);
        s.mark_fencing(&node("b"));
        let gone = [node("a")];
        let e = Evidence {
            gone_nodes: &gone,
            va_nodes: None,
        };
        assert_eq!(
            reconcile_candidates(&s, &e, Utc::now(), AGE),
            [node("a"), node("b")]
        );
    }

    #[test]
    fn clearing_one_side_ends_the_migration_and_a_failed_fence_keeps_the_slot() {
        let s = state(Sharing::Rwx, &["a", "b"], 1);
        let d = decide_reconcile(&s, &[node("a")], &[], Utc::now());
        assert_eq!(d.next.node_ids().collect::<Vec<_>>(), [&node("b")]);
        let ended = d.ended.unwrap();
        assert!(ended.source_left);
        assert!(d.next.migration_started_at.is_none());

        let d = decide_reconcile(&s, &[], &[node("a")], Utc::now());
        assert_eq!(d.next.nodes.len(), 2, "an unconfirmed fence keeps its slot");
        assert!(d.next.nodes[0].fencing);
        assert!(d.ended.is_none());
    }

    #[test]
    fn overdue_is_reported_once() {
        let mut s = state(Sharing::Rwx, &["a", "b"], 1);
        s.migration_timeout_secs = 1;
        s.migration_started_at = Some(Utc::now() - chrono::Duration::seconds(5));
        let d = decide_reconcile(&s, &[], &[], Utc::now());
        assert!(d.overdue && d.next.migration_overdue);
        let again = decide_reconcile(&d.next, &[], &[], Utc::now());
        assert!(!again.overdue);
        assert_eq!(again.next.nodes.len(), 2, "access is never revoked");
    }
}
