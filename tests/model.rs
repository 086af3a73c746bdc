//! Exhaustive model check of the attach protocol over the project's own pure decisions
//! (`decide_publish`, `decide_unpublish`, `decide_reconcile`), with stateright.
//!
//! The world: 3 nodes, one volume (volumes never share a decision: each has its own lock
//! and record), two controller replicas whose RPCs interleave step by step (read, decide
//! and write guarded by version, fence, admit), a fence that may fail, a reconciler, and
//! an NBD target that re-admits a reconnecting node when its *lagging* view of the state
//! lists it (the watch delivers whenever it likes). Every interleaving is explored to a
//! bounded depth; the invariants, whenever no grant is between the target and its
//! re-check (a grant the publish is about to confirm or withdraw):
//! - the target admits at most the mode's number of nodes (1 RWO, 2 RWX);
//! - every node the target admits is recorded in the store (fence before free);
//! - every node the CO was told is published is recorded in the store (durable OK).

use std::hash::Hash;
use std::time::Duration;

use chrono::{DateTime, Utc};
use handoff_csi::attachment::reconcile::decide_reconcile;
use handoff_csi::attachment::state::{
    decide_publish, decide_unpublish, AttachmentState, PublishContext, PublishDecision,
    PublishRequest, UnpublishDecision,
};
use handoff_csi::backend::StoredCapability;
use handoff_csi::capability::AccessMode;
use handoff_csi::ids::{NodeId, VolumeId};
use stateright::{Checker, Model, Property};

const NODES: usize = 3;
const GRACE: Duration = Duration::from_secs(30);

fn node(i: usize) -> NodeId {
    NodeId::parse(&format!("node-{i}")).unwrap()
}

fn now() -> DateTime<Utc> {
    // One instant: timestamps carry no meaning here, and the state space stays finite.
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

type Mask = u8;

fn bit(i: usize) -> Mask {
    1 << i
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Op {
    Idle,
    /// Publish: read the store at `seen` (state, version), decision not yet made.
    PubRead(usize, Option<AttachmentState>, u8),
    /// Publish decided and stored: the node is about to be admitted at the target.
    PubAdmit(usize),
    /// Admitted: the publish re-reads the store before answering (and withdraws the
    /// grant if the node was freed meanwhile).
    PubRecheck(usize),
    UnpubRead(usize, Option<AttachmentState>, u8),
    /// Unpublish: the node is marked as leaving in the store; the fence comes next.
    UnpubMarked(usize, AttachmentState, u8),
    /// Unpublish: fenced; the removal is about to be written (guarded by `seen`).
    UnpubFenced(usize, AttachmentState, u8),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct World {
    store: Option<AttachmentState>,
    version: u8,
    /// The target's (NBD authority's) view of the store: it lags until delivered.
    cache: Option<AttachmentState>,
    admitted: Mask,
    /// The target's own memory of fenced nodes (off: the model of the old target).
    fenced_here: Mask,
    /// What the CO relies on: OK publish, and no unpublish asked for since.
    published: Mask,
    /// Nodes the CO asked to unpublish since it last asked to publish them: an OK
    /// that arrives after that cannot be relied on (the requests raced).
    asked_off: Mask,
    ops: [Op; 2],
}

struct Protocol {
    mode: AccessMode,
    /// Whether the target remembers fenced nodes itself (the fix for case 11).
    target_memory: bool,
    /// Whether an unpublish marks the node as leaving before its fence.
    mark_first: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    StartPublish(usize, usize),
    FinishPublish(usize),
    Admit(usize),
    Recheck(usize),
    StartUnpublish(usize, usize),
    Mark(usize),
    Fence(usize, bool),
    CommitUnpublish(usize),
    /// The lease holder's pass: fences pending nodes (successfully) and frees them.
    Reconcile,
    Deliver,
    Reconnect(usize),
}

impl Protocol {
    fn request(&self, n: usize) -> PublishRequest {
        PublishRequest {
            node_id: node(n),
            readonly: false,
            access: StoredCapability {
                mode: self.mode,
                block: true,
            },
        }
    }

    fn limit(&self) -> usize {
        self.mode.sharing().max_nodes()
    }

    /// A guarded write: lands only on the version it was decided on.
    fn write(w: &mut World, seen: u8, next: AttachmentState) -> bool {
        if w.version != seen {
            return false;
        }
        w.version = w.version.wrapping_add(1);
        w.store = (!next.is_idle(now(), GRACE)).then_some(next);
        true
    }

    /// The record of a volume nothing has held yet.
    fn empty(&self) -> AttachmentState {
        AttachmentState::new(
            VolumeId::parse("vol-00000000000000000000000000000001").unwrap(),
            self.mode.sharing(),
            Duration::from_secs(300),
        )
    }
}

/// A publish has admitted a node and not yet re-checked it.
fn grant_in_flight(w: &World) -> bool {
    w.ops.iter().any(|op| matches!(op, Op::PubRecheck(_)))
}

/// An unpublish of node `n` has been asked for and not answered.
fn unpublishing(w: &World, n: usize) -> bool {
    w.ops.iter().any(|op| {
        matches!(op, Op::UnpubRead(m, ..) | Op::UnpubMarked(m, ..) | Op::UnpubFenced(m, ..) if *m == n)
    })
}

fn holds(s: &Option<AttachmentState>, n: usize) -> bool {
    s.as_ref()
        .is_some_and(|s| s.node_ids().any(|id| id == &node(n)))
}

impl Model for Protocol {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        vec![World {
            store: None,
            version: 0,
            cache: None,
            admitted: 0,
            fenced_here: 0,
            published: 0,
            asked_off: 0,
            ops: [Op::Idle, Op::Idle],
        }]
    }

    fn actions(&self, w: &World, actions: &mut Vec<Action>) {
        for (r, op) in w.ops.iter().enumerate() {
            match op {
                Op::Idle => {
                    for n in 0..NODES {
                        actions.push(Action::StartPublish(r, n));
                        actions.push(Action::StartUnpublish(r, n));
                    }
                }
                Op::PubRead(..) => actions.push(Action::FinishPublish(r)),
                Op::PubAdmit(_) => actions.push(Action::Admit(r)),
                Op::PubRecheck(_) => actions.push(Action::Recheck(r)),
                Op::UnpubRead(..) => actions.push(Action::Mark(r)),
                Op::UnpubMarked(..) => {
                    actions.push(Action::Fence(r, true));
                    actions.push(Action::Fence(r, false));
                }
                Op::UnpubFenced(..) => actions.push(Action::CommitUnpublish(r)),
            }
        }
        actions.push(Action::Reconcile);
        if w.cache != w.store {
            actions.push(Action::Deliver);
        }
        for n in 0..NODES {
            if w.admitted & bit(n) == 0 {
                actions.push(Action::Reconnect(n));
            }
        }
    }

    fn next_state(&self, last: &World, action: Action) -> Option<World> {
        let mut w = last.clone();
        let ctx = PublishContext {
            now: now(),
            grace: GRACE,
            migration_timeout: Duration::from_secs(300),
            ..PublishContext::default()
        };
        match action {
            Action::StartPublish(r, n) => {
                // A publish racing an unpublish still in flight is not relied on either.
                if !unpublishing(&w, n) {
                    w.asked_off &= !bit(n);
                }
                w.ops[r] = Op::PubRead(n, w.store.clone(), w.version)
            }
            Action::FinishPublish(r) => {
                let Op::PubRead(n, seen, version) = w.ops[r].clone() else {
                    return None;
                };
                let current = seen.unwrap_or_else(|| self.empty());
                w.ops[r] = match decide_publish(&current, &self.request(n), &ctx) {
                    Err(_) => Op::Idle,
                    Ok(PublishDecision::AlreadyAttached) => Op::PubAdmit(n),
                    Ok(
                        PublishDecision::Attached(next)
                        | PublishDecision::Reclaimed(next)
                        | PublishDecision::HandedOff { next, .. }
                        | PublishDecision::MigrationStarted(next),
                    ) => {
                        if Self::write(&mut w, version, next) {
                            Op::PubAdmit(n)
                        } else {
                            Op::Idle // stale: the CO hears Aborted and retries
                        }
                    }
                    // No node is ever gone in this world.
                    Ok(PublishDecision::StaleHolderCleared { .. }) => return None,
                };
            }
            Action::Admit(r) => {
                let Op::PubAdmit(n) = w.ops[r] else {
                    return None;
                };
                w.admitted |= bit(n);
                w.fenced_here &= !bit(n);
                w.ops[r] = Op::PubRecheck(n);
            }
            Action::Recheck(r) => {
                let Op::PubRecheck(n) = w.ops[r] else {
                    return None;
                };
                let holds_it = w
                    .store
                    .as_ref()
                    .is_some_and(|s| s.nodes.iter().any(|a| a.node_id == node(n) && !a.fencing));
                if holds_it {
                    if w.asked_off & bit(n) == 0 {
                        w.published |= bit(n); // OK, and relied on
                    }
                } else {
                    // Freed meanwhile: the grant is fenced again, the CO hears Aborted.
                    w.admitted &= !bit(n);
                    if self.target_memory {
                        w.fenced_here |= bit(n);
                    }
                }
                w.ops[r] = Op::Idle;
            }
            Action::StartUnpublish(r, n) => {
                // From the request on, the CO no longer relies on the node holding it.
                w.published &= !bit(n);
                w.asked_off |= bit(n);
                w.ops[r] = Op::UnpubRead(n, w.store.clone(), w.version)
            }
            Action::Mark(r) => {
                let Op::UnpubRead(n, seen, version) = w.ops[r].clone() else {
                    return None;
                };
                let attached = seen.as_ref().is_some_and(|s| {
                    decide_unpublish(s, &node(n), now(), GRACE) != UnpublishDecision::NotAttached
                });
                if !attached {
                    w.published &= !bit(n); // nothing recorded: OK
                    w.ops[r] = Op::Idle;
                    return Some(w);
                }
                let mut marked = seen.unwrap();
                if !self.mark_first {
                    w.ops[r] = Op::UnpubMarked(n, marked, version);
                    return Some(w);
                }
                if marked.mark_fencing(&node(n)) {
                    if !Self::write(&mut w, version, marked.clone()) {
                        w.ops[r] = Op::Idle; // stale: Aborted, retried by the CO
                        return Some(w);
                    }
                    w.ops[r] = Op::UnpubMarked(n, marked, w.version);
                } else {
                    w.ops[r] = Op::UnpubMarked(n, marked, version);
                }
            }
            Action::Fence(r, ok) => {
                let Op::UnpubMarked(n, current, version) = w.ops[r].clone() else {
                    return None;
                };
                let next = match decide_unpublish(&current, &node(n), now(), GRACE) {
                    UnpublishDecision::NotAttached => return None,
                    UnpublishDecision::Detached(next)
                    | UnpublishDecision::MigrationEnded { next, .. } => next,
                };
                if ok {
                    w.admitted &= !bit(n);
                    if self.target_memory {
                        w.fenced_here |= bit(n);
                    }
                    w.ops[r] = Op::UnpubFenced(n, next, version);
                } else {
                    // The node stays recorded, marked as leaving; the CO hears an error.
                    w.ops[r] = Op::Idle;
                }
            }
            Action::CommitUnpublish(r) => {
                let Op::UnpubFenced(n, next, version) = w.ops[r].clone() else {
                    return None;
                };
                if Self::write(&mut w, version, next) {
                    w.published &= !bit(n);
                }
                w.ops[r] = Op::Idle;
            }
            Action::Reconcile => {
                // A failed retry changes nothing, so only the successful one is a step.
                let current = w.store.clone()?;
                let pending: Vec<NodeId> = current.unfenced().cloned().collect();
                if pending.is_empty() {
                    return None;
                }
                for p in &pending {
                    let i = (0..NODES).find(|i| &node(*i) == p).unwrap();
                    w.admitted &= !bit(i);
                    if self.target_memory {
                        w.fenced_here |= bit(i);
                    }
                }
                let version = w.version;
                Self::write(
                    &mut w,
                    version,
                    decide_reconcile(&current, &pending, &[], now()).next,
                );
            }
            Action::Deliver => w.cache = w.store.clone(),
            Action::Reconnect(n) => {
                // A node with a device still set up dials again; the target admits it if
                // its view lists the node (not fencing) and it does not remember fencing it.
                let listed = w
                    .cache
                    .as_ref()
                    .is_some_and(|s| s.nodes.iter().any(|a| a.node_id == node(n) && !a.fencing));
                if !listed || w.fenced_here & bit(n) != 0 {
                    return None;
                }
                w.admitted |= bit(n);
            }
        }
        Some(w)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "the target admits at most the mode's nodes",
                |m: &Protocol, w: &World| {
                    grant_in_flight(w) || (w.admitted.count_ones() as usize) <= m.limit()
                },
            ),
            Property::always(
                "every admitted node is recorded (fence before free)",
                |_: &Protocol, w: &World| {
                    grant_in_flight(w)
                        || (0..NODES).all(|n| w.admitted & bit(n) == 0 || holds(&w.store, n))
                },
            ),
            // Relied on: an OK publish, with no unpublish of the node outstanding.
            Property::always("every OK publish is recorded", |_: &Protocol, w: &World| {
                (0..NODES)
                    .all(|n| w.published & bit(n) == 0 || unpublishing(w, n) || holds(&w.store, n))
            }),
            Property::sometimes(
                "a migration runs (two nodes admitted)",
                |_: &Protocol, w: &World| w.admitted.count_ones() == 2,
            ),
        ]
    }
}

fn check(
    mode: AccessMode,
    target_memory: bool,
    mark_first: bool,
    depth: usize,
) -> (usize, Option<String>) {
    let checker = Protocol {
        mode,
        target_memory,
        mark_first,
    }
    .checker()
    .threads(2)
    .target_max_depth(depth)
    .spawn_bfs()
    .join();
    let states = checker.unique_state_count();
    let broken = [
        "the target admits at most the mode's nodes",
        "every admitted node is recorded (fence before free)",
        "every OK publish is recorded",
    ]
    .iter()
    .find_map(|p| {
        checker.discovery(p).map(|path| {
            format!(
                "{p}: {:?}\nlast state: {:?}",
                path.clone().into_actions(),
                path.last_state()
            )
        })
    });
    (states, broken)
}

/// Explored depth; `HANDOFF_MODEL_DEPTH` for longer runs.
fn depth() -> usize {
    std::env::var("HANDOFF_MODEL_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(16)
}

#[test]
fn the_protocol_keeps_one_writer_in_every_interleaving() {
    for mode in [
        AccessMode::SingleNodeWriter,
        AccessMode::MultiNodeMultiWriter,
    ] {
        let depth = depth();
        let (states, broken) = check(mode, true, true, depth);
        assert!(broken.is_none(), "{mode:?}: {}", broken.unwrap());
        println!("{mode:?}: {states} states explored to depth {depth}, no violation");
        assert!(states > 20_000, "the world was explored ({states} states)");
    }
}

/// The checker can fail: a target that forgets whom it fenced (re-admitting on its
/// lagging view, as before the fix) is caught.
#[test]
fn a_target_without_fence_memory_is_caught() {
    let (_, broken) = check(AccessMode::SingleNodeWriter, false, true, depth());
    let broken = broken.expect("the model checker must find the re-admission");
    assert!(broken.contains("Reconnect"), "{broken}");
}

/// Without the leaving mark, a publish that granted access just after a concurrent
/// unpublish's fence passes its re-check and the grant outlives the fence: caught.
#[test]
fn an_unpublish_that_does_not_mark_first_is_caught() {
    let (_, broken) = check(AccessMode::SingleNodeWriter, true, false, depth());
    let broken = broken.expect("the model checker must find the late grant");
    assert!(
        broken.starts_with("every admitted node is recorded")
            || broken.starts_with("the target admits at most"),
        "{broken}"
    );
}
