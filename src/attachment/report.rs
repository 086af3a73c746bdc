//! The attachment table people read: `handoff-csi attachments` and the demo timeline.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use serde::Serialize;

use super::state::{AttachmentState, DeadlineBasis};
use crate::backend::Fencing;
use crate::capability::Sharing;

fn mode(s: Sharing) -> &'static str {
    match s {
        Sharing::Rwo => "RWO",
        Sharing::Rwx => "RWX",
        Sharing::Rox => "ROX",
    }
}

/// "1h02m", "4m05s", "12s": short enough for a table column.
fn human(secs: i64) -> String {
    let secs = secs.max(0);
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// One line per volume: mode, nodes in order (primary first), the KubeVirt migration
/// it belongs to, how long it has run, and the time left to its deadline or "overdue".
pub fn render_table(states: &[AttachmentState], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<38} {:<4} {:<28} {:<24} {:<8} DEADLINE",
        "VOLUME", "MODE", "NODES (primary first)", "MIGRATION", "RUNNING"
    );
    if states.is_empty() {
        let _ = writeln!(out, "(no attachments)");
    }
    for r in states.iter().map(|s| VolumeReport::new(s, now)) {
        let nodes: Vec<String> = r
            .nodes
            .iter()
            .map(|n| {
                if n.fencing {
                    format!("{} (FENCING: not cut off yet)", n.node)
                } else {
                    n.node.clone()
                }
            })
            .collect();
        let mut nodes = match (nodes.is_empty(), &r.released_by) {
            (true, Some(n)) => format!("(released by {n})"),
            _ => nodes.join(" → "),
        };
        let listed = |method| {
            let names: Vec<&str> = r
                .fenced
                .iter()
                .filter(|f| f.method == method)
                .map(|f| f.node.as_str())
                .collect();
            names.join(", ")
        };
        let fenced = listed(Fencing::Target);
        if !fenced.is_empty() {
            nodes.push_str(&format!(" [fenced: {fenced}]"));
        }
        let unfenced = listed(Fencing::Bookkeeping);
        if !unfenced.is_empty() {
            nodes.push_str(&format!(
                " [detached, NOT fenced (no host ACL): {unfenced}]"
            ));
        }
        let (name, running, deadline) = match &r.migration {
            Some(m) => (
                m.name.clone().unwrap_or_else(|| "(not matched)".into()),
                human(m.running_secs),
                if m.overdue {
                    format!("OVERDUE by {}", human(-m.seconds_to_deadline))
                } else {
                    format!("in {}", human(m.seconds_to_deadline))
                },
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<38} {:<4} {:<28} {:<24} {:<8} {}",
            r.volume, r.mode, nodes, name, running, deadline
        );
    }
    out
}

/// The machine-readable form of the same facts (`attachments --output json`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeReport {
    pub volume: String,
    pub mode: &'static str,
    /// Primary first; a second entry is the migration target.
    pub nodes: Vec<NodeReport>,
    pub migration: Option<MigrationReport>,
    /// The RWO holder remembered within the grace period, when nothing is attached.
    pub released_by: Option<String>,
    /// Nodes cut off at the target (or, without host ACLs, only noted) after losing their attachment.
    pub fenced: Vec<FencedReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FencedReport {
    pub node: String,
    pub at: DateTime<Utc>,
    /// `target`: cut off there; `bookkeeping`: only noted (a backend without host ACLs).
    pub method: crate::backend::Fencing,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeReport {
    pub node: String,
    pub role: &'static str,
    pub attached_at: DateTime<Utc>,
    pub readonly: bool,
    /// Unpublished, fence not confirmed yet: still able to write.
    pub fencing: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MigrationReport {
    /// namespace/name of the VirtualMachineInstanceMigration, when matched.
    pub name: Option<String>,
    pub uid: Option<String>,
    pub vmi: Option<String>,
    pub source: String,
    pub target: String,
    pub started_at: DateTime<Utc>,
    pub running_secs: i64,
    pub deadline: DateTime<Utc>,
    /// Negative once overdue.
    pub seconds_to_deadline: i64,
    pub overdue: bool,
    pub deadline_basis: String,
}

impl VolumeReport {
    pub fn new(s: &AttachmentState, now: DateTime<Utc>) -> Self {
        let nodes = s
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeReport {
                node: n.node_id.to_string(),
                role: match (s.sharing, i) {
                    (Sharing::Rwx, 1) => "migration-target",
                    (Sharing::Rox, _) => "reader",
                    _ => "primary",
                },
                attached_at: n.attached_at,
                readonly: n.readonly,
                fencing: n.fencing,
            })
            .collect();
        let migration = match (
            s.nodes.as_slice(),
            s.migration_started_at,
            s.migration_deadline(),
        ) {
            ([source, target], Some(started), Some(deadline)) if s.sharing == Sharing::Rwx => {
                Some(MigrationReport {
                    name: s.migration.as_ref().map(|m| m.to_string()),
                    uid: s.migration.as_ref().map(|m| m.uid.clone()),
                    vmi: s.migration.as_ref().map(|m| m.vmi.clone()),
                    source: source.node_id.to_string(),
                    target: target.node_id.to_string(),
                    started_at: started,
                    running_secs: (now - started).num_seconds(),
                    deadline,
                    seconds_to_deadline: (deadline - now).num_seconds(),
                    overdue: s.migration_overdue || now > deadline,
                    deadline_basis: s
                        .deadline_basis
                        .clone()
                        .unwrap_or(DeadlineBasis::StorageClass)
                        .to_string(),
                })
            }
            _ => None,
        };
        VolumeReport {
            volume: s.volume_id.to_string(),
            mode: mode(s.sharing),
            nodes,
            migration,
            released_by: s
                .released
                .as_ref()
                .filter(|_| s.nodes.is_empty())
                .map(|r| r.node_id.to_string()),
            fenced: s
                .fenced
                .iter()
                .map(|f| FencedReport {
                    node: f.node_id.to_string(),
                    at: f.at,
                    method: f.method,
                })
                .collect(),
        }
    }
}

/// `{"generated_at": …, "volumes": [...]}`: one JSON document.
pub fn render_json(states: &[AttachmentState], now: DateTime<Utc>) -> String {
    let volumes: Vec<VolumeReport> = states.iter().map(|s| VolumeReport::new(s, now)).collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "generated_at": now,
        "volumes": volumes,
    }))
    .expect("reports serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::state::{MigrationRef, NodeAttachment, DEFAULT_MIGRATION_TIMEOUT};
    use crate::ids::{NodeId, VolumeId};

    fn migrating(now: DateTime<Utc>, started_secs_ago: i64) -> AttachmentState {
        let mut s = AttachmentState::new(
            VolumeId::generate(),
            Sharing::Rwx,
            DEFAULT_MIGRATION_TIMEOUT,
        );
        for n in ["node-a", "node-b"] {
            s.nodes.push(NodeAttachment {
                node_id: NodeId::parse(n).unwrap(),
                attached_at: now,
                readonly: false,
                access: None,
                fencing: false,
            });
        }
        s.migration_started_at = Some(now - chrono::Duration::seconds(started_secs_ago));
        s
    }

    #[test]
    fn table_shows_order_migration_and_deadline() {
        let now = Utc::now();
        let mut s = migrating(now, 100);
        let table = render_table(&[s.clone()], now);
        assert!(table.contains("node-a → node-b"), "{table}");
        assert!(table.contains("(not matched)"), "{table}");
        assert!(table.contains("1m40s"), "{table}");
        assert!(table.contains("in 3m20s"), "{table}");
        s.migration = Some(MigrationRef {
            namespace: "vms".into(),
            name: "evacuate-x".into(),
            uid: "u".into(),
            vmi: "x".into(),
        });
        s.migration_started_at = Some(now - chrono::Duration::seconds(400));
        let table = render_table(&[s], now);
        assert!(table.contains("vms/evacuate-x"), "{table}");
        assert!(table.contains("OVERDUE by 1m40s"), "{table}");
        assert!(render_table(&[], now).contains("no attachments"));
    }

    #[test]
    fn json_carries_the_same_facts() {
        let now = Utc::now();
        let mut s = migrating(now, 400);
        s.migration_overdue = true;
        let v: serde_json::Value = serde_json::from_str(&render_json(&[s.clone()], now)).unwrap();
        let vol = &v["volumes"][0];
        assert_eq!(vol["volume"], s.volume_id.to_string());
        assert_eq!(vol["nodes"][1]["role"], "migration-target");
        assert_eq!(vol["migration"]["overdue"], true);
        assert_eq!(vol["migration"]["seconds_to_deadline"], -100);
        assert_eq!(vol["migration"]["running_secs"], 400);
        assert_eq!(
            vol["migration"]["deadline_basis"],
            "StorageClass migrationTimeoutSeconds"
        );
        assert!(vol["migration"]["name"].is_null());
        s.nodes.pop();
        s.record_fence(&NodeId::parse("node-x").unwrap(), now, Fencing::Target);
        let table = render_table(&[s.clone()], now);
        assert!(table.contains("node-a [fenced: node-x]"), "{table}");
        let v: serde_json::Value = serde_json::from_str(&render_json(&[s], now)).unwrap();
        assert_eq!(v["volumes"][0]["fenced"][0]["node"], "node-x");
        assert_eq!(v["volumes"][0]["fenced"][0]["method"], "target");
    }

    #[test]
    fn a_detach_without_host_acl_is_not_shown_as_fenced() {
        let now = Utc::now();
        let mut s = migrating(now, 10);
        s.nodes.pop();
        s.record_fence(&NodeId::parse("node-x").unwrap(), now, Fencing::Bookkeeping);
        let table = render_table(&[s.clone()], now);
        assert!(!table.contains("[fenced"), "{table}");
        assert!(
            table.contains("[detached, NOT fenced (no host ACL): node-x]"),
            "{table}"
        );
        let v: serde_json::Value = serde_json::from_str(&render_json(&[s], now)).unwrap();
        assert_eq!(v["volumes"][0]["fenced"][0]["method"], "bookkeeping");
    }

    #[test]
    fn a_node_waiting_for_its_fence_is_shown_as_such() {
        let now = Utc::now();
        let mut s = migrating(now, 10);
        s.mark_fencing(&NodeId::parse("node-a").unwrap());
        let table = render_table(&[s.clone()], now);
        assert!(
            table.contains("node-a (FENCING: not cut off yet)"),
            "{table}"
        );
        let v: serde_json::Value = serde_json::from_str(&render_json(&[s], now)).unwrap();
        assert_eq!(v["volumes"][0]["nodes"][0]["fencing"], true);
    }
}
