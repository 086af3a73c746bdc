//! The attachment table people read: `handoff-csi attachments` and the demo timeline.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use super::state::AttachmentState;
use crate::capability::Sharing;

fn mode(s: Sharing) -> &'static str {
    match s {
        Sharing::Rwo => "RWO",
        Sharing::Rwx => "RWX",
        Sharing::Rox => "ROX",
    }
}

/// One line per volume: mode, nodes in order (primary first), migration start and the
/// time left before the migration deadline.
pub fn render_table(states: &[AttachmentState], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<38} {:<4} {:<28} {:<21} TIMEOUT LEFT",
        "VOLUME", "MODE", "NODES (primary first)", "MIGRATING SINCE"
    );
    if states.is_empty() {
        let _ = writeln!(out, "(no attachments)");
    }
    for s in states {
        let nodes: Vec<&str> = s.node_ids().map(|n| n.as_str()).collect();
        let nodes = match (nodes.is_empty(), &s.released) {
            (true, Some(r)) => format!("(released by {})", r.node_id),
            _ => nodes.join(" → "),
        };
        let (since, left) = match (s.migration_started_at, s.migration_deadline()) {
            (Some(start), Some(deadline)) => {
                let left = (deadline - now).num_seconds();
                let left = if left >= 0 {
                    format!("{left}s")
                } else {
                    format!("OVERDUE by {}s", -left)
                };
                (start.format("%H:%M:%S%.3f").to_string(), left)
            }
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<38} {:<4} {:<28} {:<21} {}",
            s.volume_id,
            mode(s.sharing),
            nodes,
            since,
            left
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::state::{NodeAttachment, DEFAULT_MIGRATION_TIMEOUT};
    use crate::ids::{NodeId, VolumeId};

    #[test]
    fn table_shows_order_and_deadline() {
        let mut s = AttachmentState::new(
            VolumeId::generate(),
            Sharing::Rwx,
            DEFAULT_MIGRATION_TIMEOUT,
        );
        for n in ["node-a", "node-b"] {
            s.nodes.push(NodeAttachment {
                node_id: NodeId::parse(n).unwrap(),
                attached_at: Utc::now(),
                readonly: false,
            });
        }
        let now = Utc::now();
        s.migration_started_at = Some(now - chrono::Duration::seconds(100));
        let table = render_table(&[s.clone()], now);
        assert!(table.contains("node-a → node-b"), "{table}");
        assert!(table.contains("200s"), "{table}");
        s.migration_started_at = Some(now - chrono::Duration::seconds(400));
        assert!(render_table(&[s], now).contains("OVERDUE by 100s"));
        assert!(render_table(&[], now).contains("no attachments"));
    }
}
