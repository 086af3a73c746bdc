//! Start-up rebuild: the store is authoritative about order and timers, VolumeAttachments
//! about *which* nodes hold a volume. Disagreements are repaired, logged and reported.

use chrono::{DateTime, Utc};

use super::cluster::{index, AttachmentObject, ClusterView};
use super::events::{AttachEvent, EventSink};
use super::state::{AttachmentState, NodeAttachment, DEFAULT_MIGRATION_TIMEOUT};
use super::store::AttachmentStore;
use crate::capability::Sharing;
use crate::ids::NodeId;

/// How one volume's stored state differs from its VolumeAttachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub next: AttachmentState,
    /// attached=true in the cluster but missing from the store: appended, in the order
    /// their objects were created.
    pub added: Vec<NodeId>,
    /// In the store but without any VolumeAttachment: kept, marked for fencing (the
    /// reconciler cuts them off before their slots are freed).
    pub removed: Vec<NodeId>,
}

/// A node joining from a VolumeAttachment: when it was created, and the volume's rule
/// for read-only.
fn joined(sharing: Sharing, o: &AttachmentObject, now: DateTime<Utc>) -> NodeAttachment {
    NodeAttachment {
        node_id: o.node.clone(),
        attached_at: o.created.unwrap_or(now),
        readonly: sharing == Sharing::Rox,
        access: None,
        fencing: false,
    }
}

/// Attached objects, oldest first: that is the order the nodes joined in, so the
/// migration source comes first whatever order the API server listed them.
fn by_age(objects: &[AttachmentObject]) -> Vec<&AttachmentObject> {
    let mut attached: Vec<&AttachmentObject> = objects.iter().filter(|o| o.attached).collect();
    attached.sort_by(|a, b| (a.created, &a.node).cmp(&(b.created, &b.node)));
    attached
}

/// The bookkeeping that follows from who holds the volume: a migration starts when its
/// target joined; more holders than the volume's mode allows is a conflict, refused
/// until resolved, never adopted as several writers.
fn settle(next: &mut AttachmentState) {
    // A node waiting for its fence is not cut off yet: it counts.
    next.conflict = next.nodes.len() > next.sharing.max_nodes();
    match (next.sharing, next.nodes.as_slice()) {
        (Sharing::Rwx, [_, target]) if next.migration_started_at.is_none() => {
            next.migration_started_at = Some(target.attached_at)
        }
        (_, n) if n.len() < 2 => next.clear_migration(),
        _ => {}
    }
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
        .nodes
        .iter()
        .filter(|a| !a.fencing && !objects.iter().any(|o| o.node == a.node_id))
        .map(|a| a.node_id.clone())
        .collect();
    for node in &removed {
        next.mark_fencing(node);
    }
    let mut added = Vec::new();
    for o in by_age(objects) {
        if !state.node_ids().any(|n| n == &o.node) {
            next.nodes.push(joined(state.sharing, o, now));
            added.push(o.node.clone());
        }
    }
    if added.is_empty() && removed.is_empty() {
        return None;
    }
    settle(&mut next);
    Some(Repair {
        next,
        added,
        removed,
    })
}

/// What rebuilding one volume came to.
enum Rebuilt {
    Kept(AttachmentState),
    Repaired(Repair),
    Adopted(AttachmentState),
}

/// Bounded retries for a transient failure during start-up: one object's trouble must
/// not keep the rest of the controller from starting.
const REBUILD_ATTEMPTS: u32 = 4;

async fn save_with_retry(store: &dyn AttachmentStore, state: &AttachmentState) -> bool {
    let mut delay = std::time::Duration::from_millis(100);
    for attempt in 1..=REBUILD_ATTEMPTS {
        match store.save(state).await {
            Ok(()) => return true,
            Err(e) if attempt == REBUILD_ATTEMPTS => {
                tracing::error!(volume_id = %state.volume_id, error = %e, "repaired attachment state could not be stored; the reconciler looks at it again");
            }
            Err(e) => {
                tracing::warn!(volume_id = %state.volume_id, error = %e, attempt, "storing repaired attachment state failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    false
}

async fn attachments_with_retry(cluster: &dyn ClusterView) -> Option<Vec<AttachmentObject>> {
    let mut delay = std::time::Duration::from_millis(100);
    for attempt in 1..=REBUILD_ATTEMPTS {
        match cluster.attachments().await {
            Ok(objects) => return objects,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "VolumeAttachments unavailable for the start-up cross-check");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    tracing::error!("starting without the VolumeAttachment cross-check; the reconciler does it once they can be read");
    None
}

pub async fn cross_check(
    loaded: Vec<AttachmentState>,
    cluster: &dyn ClusterView,
    store: &dyn AttachmentStore,
    events: &dyn EventSink,
) -> Vec<AttachmentState> {
    let Some(objects) = attachments_with_retry(cluster).await else {
        return loaded;
    };
    let mut by_volume = index(objects);
    let now = Utc::now();
    let mut rebuilt = Vec::with_capacity(loaded.len());
    for state in loaded {
        let objects = by_volume.remove(&state.volume_id).unwrap_or_default();
        rebuilt.push(match repair(&state, &objects, now) {
            None => Rebuilt::Kept(state),
            Some(r) => Rebuilt::Repaired(r),
        });
    }
    // Attached in the cluster, unknown to the store: volumes of the driver this one
    // replaced (the Go RDS driver kept its own annotations), or state lost with a store.
    // Adopted with the mode of their PV, so the rules hold for them from the start.
    for (volume, objects) in by_volume {
        if !objects.iter().any(|o| o.attached) {
            continue;
        }
        match cluster.sharing_of(&volume).await {
            Ok(Some(sharing)) => {
                rebuilt.push(Rebuilt::Adopted(adopt(&volume, sharing, &objects, now)))
            }
            Ok(None) => {
                tracing::warn!(volume_id = %volume, "VolumeAttachments report attached but no attachment state exists, and the PV's access mode is unknown");
                events.emit(&AttachEvent::StateRepaired {
                    volume,
                    added: Vec::new(),
                    removed: Vec::new(),
                });
            }
            Err(e) => {
                tracing::error!(volume_id = %volume, error = %e, "cannot adopt attachments known only from VolumeAttachments");
            }
        }
    }
    let mut states = Vec::with_capacity(rebuilt.len());
    for r in rebuilt {
        let (state, added, removed) = match r {
            Rebuilt::Kept(state) => {
                states.push(state);
                continue;
            }
            Rebuilt::Repaired(r) => (r.next, r.added, r.removed),
            Rebuilt::Adopted(state) => {
                let added = state.node_ids().cloned().collect();
                (state, added, Vec::new())
            }
        };
        tracing::warn!(volume_id = %state.volume_id, ?added, ?removed, conflict = state.conflict,
            "stored attachment state disagreed with VolumeAttachments; repaired");
        if !save_with_retry(store, &state).await {
            continue;
        }
        if state.conflict {
            events.emit(&AttachEvent::ClusterConflict {
                volume: state.volume_id.clone(),
                nodes: state.node_ids().cloned().collect(),
            });
        }
        events.emit(&AttachEvent::StateRepaired {
            volume: state.volume_id.clone(),
            added,
            removed,
        });
        states.push(state);
    }
    states
}

/// Pure: the state of a volume the cluster says is attached through `objects` and that
/// the store does not know.
pub fn adopt(
    volume: &crate::ids::VolumeId,
    sharing: Sharing,
    objects: &[AttachmentObject],
    now: DateTime<Utc>,
) -> AttachmentState {
    let mut state = AttachmentState::new(volume.clone(), sharing, DEFAULT_MIGRATION_TIMEOUT);
    state.nodes = by_age(objects)
        .into_iter()
        .map(|o| joined(sharing, o, now))
        .collect();
    settle(&mut state);
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
            created: None,
        }
    }

    fn obj_at(v: &VolumeId, n: &str, secs_ago: i64) -> AttachmentObject {
        AttachmentObject {
            created: Some(Utc::now() - chrono::Duration::seconds(secs_ago)),
            ..obj(v, n, true)
        }
    }

    fn state(sharing: Sharing, nodes: &[&str]) -> AttachmentState {
        let mut s = AttachmentState::new(VolumeId::generate(), sharing, DEFAULT_MIGRATION_TIMEOUT);
        for n in nodes {
            s.nodes.push(NodeAttachment {
                node_id: node(n),
                attached_at: Utc::now(),
                readonly: false,
                access: None,
                fencing: false,
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
    fn nodes_without_volume_attachment_are_marked_for_fencing_not_freed() {
        let mut s = state(Sharing::Rwx, &["a", "b"]);
        s.migration_started_at = Some(Utc::now());
        let v = s.volume_id.clone();
        let r = repair(&s, &[obj(&v, "b", true)], Utc::now()).unwrap();
        assert_eq!(r.removed, vec![node("a")]);
        // Fence before free: the slot stays taken until the reconciler cut it off.
        assert_eq!(r.next.nodes.len(), 2);
        assert!(r.next.nodes[0].fencing && !r.next.nodes[1].fencing);
        assert_eq!(r.next.unfenced().collect::<Vec<_>>(), [&node("a")]);
    }

    #[test]
    fn rox_nodes_stay_read_only_through_repair_and_adoption() {
        let s = state(Sharing::Rox, &["a"]);
        let v = s.volume_id.clone();
        let r = repair(&s, &[obj(&v, "a", true), obj(&v, "b", true)], Utc::now()).unwrap();
        assert!(
            r.next.nodes[1].readonly,
            "a read-only node never becomes a writer"
        );
        let adopted = adopt(&v, Sharing::Rox, &[obj(&v, "c", true)], Utc::now());
        assert!(adopted.nodes.iter().all(|a| a.readonly));
    }

    #[test]
    fn rwx_order_and_migration_start_come_from_creation_times() {
        let v = VolumeId::generate();
        // Listed newest first, as a hash map or the API server may.
        let objects = [obj_at(&v, "target", 10), obj_at(&v, "source", 600)];
        for _ in 0..6 {
            let s = adopt(&v, Sharing::Rwx, &objects, Utc::now());
            assert_eq!(
                s.node_ids().collect::<Vec<_>>(),
                [&node("source"), &node("target")]
            );
            assert_eq!(Some(s.nodes[1].attached_at), objects[0].created);
            assert_eq!(s.migration_started_at, objects[0].created);
        }
    }

    #[test]
    fn rwo_on_two_nodes_is_a_conflict_not_two_writers() {
        let v = VolumeId::generate();
        let s = adopt(
            &v,
            Sharing::Rwo,
            &[obj_at(&v, "a", 60), obj_at(&v, "b", 5)],
            Utc::now(),
        );
        assert!(s.conflict);
        let single = state(Sharing::Rwo, &["a"]);
        let v = single.volume_id.clone();
        let r = repair(
            &single,
            &[obj(&v, "a", true), obj(&v, "b", true)],
            Utc::now(),
        )
        .unwrap();
        assert!(r.next.conflict);
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
