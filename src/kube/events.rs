//! Kubernetes Events for attachment decisions, on the PV and on its bound PVC, so
//! `kubectl describe pvc` shows a migration's start, end, timeout and conflicts.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Client};

use super::cache::ClusterCache;
use super::kubevirt::KubevirtCache;
use crate::attachment::events::{migration_name, AttachEvent, EventSink};
use crate::attachment::state::MigrationOutcome;

pub struct KubeEvents {
    client: Client,
    cache: Arc<ClusterCache>,
    kubevirt: Option<Arc<KubevirtCache>>,
    component: String,
    /// (object, reason, message) → when it was last recorded: a refusal repeated by the
    /// attacher's retries and resyncs is one Event, not one per retry.
    recent:
        parking_lot::Mutex<std::collections::HashMap<(String, String, String), std::time::Instant>>,
}

/// Identical Events on one object within this window are recorded once.
pub const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// core/v1 validation refuses an Event whose note is longer than this when eventTime is
/// set (422); the full text stays in the log.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` cut at a character boundary to fit the API server's limit, marked as cut.
pub fn cap_message(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    const MORE: &str = " … (cut; the controller log has the full message)";
    let mut end = MAX_MESSAGE_BYTES - MORE.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &message[..end])
}

impl KubeEvents {
    pub fn new(client: Client, cache: Arc<ClusterCache>, component: &str) -> Self {
        KubeEvents {
            client,
            cache,
            kubevirt: None,
            component: component.to_owned(),
            recent: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether this Event was recorded within the repeat window (and notes it if not).
    fn repeated(&self, object: &ObjectReference, reason: &str, message: &str) -> bool {
        let now = std::time::Instant::now();
        let key = (
            format!(
                "{}/{}/{}",
                object.kind.as_deref().unwrap_or(""),
                object.namespace.as_deref().unwrap_or(""),
                object.name.as_deref().unwrap_or("")
            ),
            reason.to_owned(),
            message.to_owned(),
        );
        let mut recent = self.recent.lock();
        if recent.len() > 4096 {
            recent.retain(|_, at| now.duration_since(*at) < REPEAT_WINDOW);
            if recent.len() > 4096 {
                recent.clear();
            }
        }
        match recent.get(&key) {
            Some(at) if now.duration_since(*at) < REPEAT_WINDOW => true,
            _ => {
                recent.insert(key, now);
                false
            }
        }
    }

    /// VMI Events carry the VMI's uid, taken from this cache.
    pub fn with_kubevirt(mut self, kubevirt: Arc<KubevirtCache>) -> Self {
        self.kubevirt = Some(kubevirt);
        self
    }
}

/// (type, reason, message) for the events worth an object Event.
fn describe(event: &AttachEvent) -> Option<(&'static str, &'static str, String)> {
    Some(match event {
        AttachEvent::MigrationStarted(m) => (
            "Normal",
            "MigrationStarted",
            format!(
                "attached to {} as live-migration target of {}; {} remains primary; deadline {}",
                m.target,
                migration_name(&m.migration),
                m.source,
                m.deadline.map_or_else(|| "none".into(), |d| d.to_rfc3339()),
            ),
        ),
        AttachEvent::MigrationMatched(m) => (
            "Normal",
            "MigrationMatched",
            format!(
                "dual attach {} → {} belongs to migration {}; deadline {}",
                m.source,
                m.target,
                migration_name(&m.migration),
                m.deadline.map_or_else(|| "none".into(), |d| d.to_rfc3339()),
            ),
        ),
        AttachEvent::MigrationEnded { source, target, remaining, outcome, basis, migration, duration, .. } => (
            if *outcome == MigrationOutcome::Completed { "Normal" } else { "Warning" },
            match outcome {
                MigrationOutcome::Completed => "MigrationCompleted",
                MigrationOutcome::Aborted => "MigrationAborted",
                MigrationOutcome::Failed => "MigrationFailed",
            },
            format!(
                "migration {} from {source} to {target} {} (by {basis}); {remaining} is now the only node{}",
                migration_name(migration),
                outcome.as_str(),
                duration.map_or_else(String::new, |d| format!("; dual attach lasted {}s", d.as_secs())),
            ),
        ),
        AttachEvent::MigrationOverdue { source, target, migration, timeout_secs, .. } => (
            "Warning",
            "MigrationOverdue",
            format!("migration {} has kept {source} and {target} attached for longer than its {timeout_secs}s deadline; both keep access and nothing is detached — check the VirtualMachineInstanceMigration", migration_name(migration)),
        ),
        AttachEvent::AttachConflict { message, .. } => ("Warning", "AttachConflict", message.clone()),
        AttachEvent::HandedOff { from, to, .. } => (
            "Normal",
            "HandedOff",
            format!("moved from {from} to {to} within the attach grace period"),
        ),
        AttachEvent::StaleHolderCleared { holder, to, .. } => (
            "Warning",
            "StaleAttachmentCleared",
            format!("node {holder} no longer exists; its attachment was cleared for {to}"),
        ),
        AttachEvent::StateRepaired { added, removed, .. } => (
            "Warning",
            "AttachmentStateRepaired",
            format!("stored attachments disagreed with VolumeAttachments: added {added:?}, removed {removed:?}"),
        ),
        AttachEvent::Quarantined { reason, .. } => ("Warning", "AttachmentQuarantined", reason.clone()),
        AttachEvent::ClusterConflict { nodes, .. } => (
            "Warning",
            "AttachConflictInCluster",
            format!("VolumeAttachments show this single-writer volume on {nodes:?} at once; no new publish is accepted until all but one are deleted — check which node really runs the workload"),
        ),
        AttachEvent::Fenced { node, connections, ok: true, .. } => (
            "Normal",
            "NodeFenced",
            format!(
                "node {node} cut off at the storage target ({}); it can no longer read or write the volume",
                connections.map_or("its live connections dropped".to_owned(), |n| format!("{n} connection(s) dropped"))
            ),
        ),
        AttachEvent::Fenced { node, ok: false, .. } => (
            "Warning",
            "FenceFailed",
            format!("node {node} could not be cut off at the storage target yet; it keeps its attachment slot, ControllerUnpublish fails and the fence is retried until it succeeds"),
        ),
        AttachEvent::Attached { .. } | AttachEvent::Detached { .. } | AttachEvent::Restored { .. } => return None,
    })
}

impl EventSink for KubeEvents {
    fn emit(&self, event: &AttachEvent) {
        let Some((kind, reason, message)) = describe(event) else {
            return;
        };
        let Some(pv) = event.volume().and_then(|v| self.cache.pv_for(v)) else {
            return;
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let message = cap_message(&message);
        let mut targets = vec![(
            "default".to_owned(),
            ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolume".into()),
                name: Some(pv.name.clone()),
                uid: pv.uid.clone(),
                ..Default::default()
            },
        )];
        // `kubectl describe vmi` shows what the storage saw of its migration.
        if let Some(m) = event.migration() {
            targets.push((
                m.namespace.clone(),
                ObjectReference {
                    api_version: Some("kubevirt.io/v1".into()),
                    kind: Some("VirtualMachineInstance".into()),
                    name: Some(m.vmi.clone()),
                    namespace: Some(m.namespace.clone()),
                    uid: self
                        .kubevirt
                        .as_ref()
                        .and_then(|k| k.vmi_uid(&m.namespace, &m.vmi)),
                    ..Default::default()
                },
            ));
        }
        if let Some((ns, name)) = pv.claim {
            targets.push((
                ns.clone(),
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    name: Some(name),
                    namespace: Some(ns),
                    uid: pv.claim_uid.clone(),
                    ..Default::default()
                },
            ));
        }
        for (namespace, involved) in targets {
            if self.repeated(&involved, reason, &message) {
                tracing::debug!(
                    reason,
                    "same Event recorded within the last 10 minutes; not repeated"
                );
                continue;
            }
            let ev = Event {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{}.", involved.name.clone().unwrap_or_default())),
                    namespace: Some(namespace.clone()),
                    ..Default::default()
                },
                involved_object: involved,
                reason: Some(reason.into()),
                message: Some(message.clone()),
                type_: Some(kind.into()),
                first_timestamp: Some(Time(now)),
                last_timestamp: Some(Time(now)),
                event_time: Some(MicroTime(now)),
                count: Some(1),
                action: Some("Attach".into()),
                reporting_component: Some(self.component.clone()),
                reporting_instance: Some(self.component.clone()),
                source: Some(EventSource {
                    component: Some(self.component.clone()),
                    host: None,
                }),
                ..Default::default()
            };
            let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
            // Events are best effort: never hold up an attach decision for one.
            tokio::spawn(async move {
                if let Err(e) = api.create(&PostParams::default(), &ev).await {
                    // An Event the API server refuses is a decision nobody sees in
                    // `kubectl describe`: say so where operators look next.
                    tracing::warn!(error = %e, reason = ev.reason.as_deref().unwrap_or(""), object = ev.involved_object.name.as_deref().unwrap_or(""), "the API server refused a Kubernetes Event");
                }
            });
        }
    }
}
