//! Start-up rebuild: the store is authoritative about order and timers, VolumeAttachments
//! about *which* nodes hold a volume. Disagreements are repaired, logged and reported.

use chrono::{DateTime, Utc};

use super::cluster::{index, AttachmentObject, ClusterView};
use super::events::{AttachEvent, EventSink};
use super::state::{AttachmentState, NodeAttachment, DEFAULT_MIGRATION_TIMEOUT};
use super::store::AttachmentStore;
use super::AttachError;
use crate::capability::Sharing;
use crate::ids::NodeId;

/// How one volume's stored state differs from its VolumeAttachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub next: AttachmentState,
    /// attached=true in the cluster but missing from the store: appended, in that order.
    pub added: Vec<NodeId>,
    /// In the store but without any VolumeAttachment: dropped.
    pub removed: Vec<NodeId>,
}

/// Pure: repairs `state` against the VolumeAttachments of its volume. A node with a
/// VolumeAttachment that is not yet attached is kept: the attacher is mid-publish and
/// its retry will be idempotent.
pub fn repair(
    state: &AttachmentState,
    objects: &[AttachmentObject],
    now: DateTime<Utc>,
) -> Option<Repair> {
    let mut next = state.clone();
    let removed: Vec<NodeId> = state
        .node_ids()
        .filter(|n| !objects.iter().any(|o| &o.node == *n))
        .cloned()
        .collect();
    next.nodes.retain(|a| !removed.contains(&a.node_id));
    let added: Vec<NodeId> = objects
        .iter()
        .filter(|o| o.attached && !state.node_ids().any(|n| n == &o.node))
        .map(|o| o.node.clone())
        .collect();
    for node in &added {
        next.nodes.push(NodeAttachment {
            node_id: node.clone(),
            attached_at: now,
            readonly: false,
        });
    }
    if added.is_empty() && removed.is_empty() {
        return None;
    }
    match (state.sharing, next.nodes.len()) {
        (Sharing::Rwx, 2) if next.migration_started_at.is_none() => {
            next.migration_started_at = Some(now)
        }
        (_, n) if n < 2 => {
            next.migration_started_at = None;
            next.migration = None;
            next.deadline_basis = None;
            next.migration_overdue = false;
        }
        _ => {}
    }
    Some(Repair {
        next,
        added,
        removed,
    })
}

pub async fn cross_check(
    loaded: Vec<AttachmentState>,
    cluster: &dyn ClusterView,
    store: &dyn AttachmentStore,
    events: &dyn EventSink,
) -> Result<Vec<AttachmentState>, AttachError> {
    let Some(objects) = cluster.attachments().await? else {
        return Ok(loaded);
    };
    let mut by_volume = index(objects);
    let now = Utc::now();
    let mut states = Vec::with_capacity(loaded.len());
    for state in loaded {
        let objects = by_volume.remove(&state.volume_id).unwrap_or_default();
        match repair(&state, &objects, now) {
            None => states.push(state),
            Some(r) => {
                tracing::warn!(
                    volume_id = %state.volume_id,
                    added = ?r.added,
                    removed = ?r.removed,
                    "stored attachment state disagreed with VolumeAttachments; repaired"
                );
                store.save(&r.next).await?;
                events.emit(&AttachEvent::StateRepaired {
                    volume: state.volume_id.clone(),
                    added: r.added,
                    removed: r.removed,
                });
                states.push(r.next);
            }
        }
    }
    // Attached in the cluster, unknown to the store: volumes of the driver this one
    // replaced (the Go RDS driver kept its own annotations), or state lost with a store.
    // Adopted with the mode of their PV, so the rules hold for them from the start;
    // reported only when the PV does not say.
    for (volume, objects) in by_volume {
        let attached: Vec<NodeId> = objects
            .into_iter()
            .filter(|o| o.attached)
            .map(|o| o.node)
            .collect();
        if attached.is_empty() {
            continue;
        }
        let Some(sharing) = cluster.sharing_of(&volume).await? else {
            tracing::warn!(volume_id = %volume, nodes = ?attached, "VolumeAttachments report attached but no attachment state exists, and the PV's access mode is unknown");
            events.emit(&AttachEvent::StateRepaired {
                volume,
                added: Vec::new(),
                removed: Vec::new(),
            });
            continue;
        };
        let adopted = adopt(&volume, sharing, &attached, now);
        tracing::warn!(volume_id = %volume, nodes = ?attached, ?sharing, "adopted attachments known only from VolumeAttachments");
        store.save(&adopted).await?;
        events.emit(&AttachEvent::StateRepaired {
            volume,
            added: attached,
            removed: Vec::new(),
        });
        states.push(adopted);
    }
    Ok(states)
}

/// Pure: the state of a volume the cluster says is attached to `nodes` (in the order the
/// cluster lists them) and that the store does not know.
pub fn adopt(
    volume: &crate::ids::VolumeId,
    sharing: Sharing,
    nodes: &[NodeId],
    now: DateTime<Utc>,
) -> AttachmentState {
    let mut state = AttachmentState::new(volume.clone(), sharing, DEFAULT_MIGRATION_TIMEOUT);
    state.nodes = nodes
        .iter()
        .map(|n| NodeAttachment {
            node_id: n.clone(),
            attached_at: now,
            readonly: sharing == Sharing::Rox,
        })
        .collect();
    if sharing == Sharing::Rwx && state.nodes.len() == 2 {
        state.migration_started_at = Some(now);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::state::DEFAULT_MIGRATION_TIMEOUT;
    use crate::ids::VolumeId;

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn obj(v: &VolumeId, n: &str, attached: bool) -> AttachmentObject {
        AttachmentObject {
            volume: v.clone(),
            node: node(n),
            attached,
        }
    }

    fn state(sharing: Sharing, nodes: &[&str]) -> AttachmentState {
        let mut s = AttachmentState::new(VolumeId::generate(), sharing, DEFAULT_MIGRATION_TIMEOUT);
        for n in nodes {
            s.nodes.push(NodeAttachment {
                node_id: node(n),
                attached_at: Utc::now(),
                readonly: false,
            });
        }
        s
    }

    #[test]
    fn agreement_needs_no_repair() {
        let s = state(Sharing::Rwx, &["a", "b"]);
        let v = s.volume_id.clone();
        assert_eq!(
            repair(&s, &[obj(&v, "b", true), obj(&v, "a", true)], Utc::now()),
            None
        );
        // Pending VolumeAttachment (attached=false) keeps the node.
        assert_eq!(
            repair(&s, &[obj(&v, "a", true), obj(&v, "b", false)], Utc::now()),
            None
        );
    }

    #[test]
    fn nodes_without_volume_attachment_are_dropped_order_kept() {
        let mut s = state(Sharing::Rwx, &["a", "b"]);
        s.migration_started_at = Some(Utc::now());
        let v = s.volume_id.clone();
        let r = repair(&s, &[obj(&v, "b", true)], Utc::now()).unwrap();
        assert_eq!(r.removed, vec![node("a")]);
        assert_eq!(r.next.node_ids().collect::<Vec<_>>(), [&node("b")]);
        assert!(r.next.migration_started_at.is_none());
    }

    #[test]
    fn attached_nodes_missing_from_the_store_are_appended() {
        let s = state(Sharing::Rwx, &["a"]);
        let v = s.volume_id.clone();
        let r = repair(&s, &[obj(&v, "a", true), obj(&v, "b", true)], Utc::now()).unwrap();
        assert_eq!(r.added, vec![node("b")]);
        assert_eq!(
            r.next.node_ids().collect::<Vec<_>>(),
            [&node("a"), &node("b")]
        );
        assert!(r.next.migration_started_at.is_some());
    }
}
