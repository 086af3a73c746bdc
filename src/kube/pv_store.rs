//! AttachmentStore on PersistentVolume annotations: the whole state as JSON in
//! `handoff.csi.dev/attachment`, and a readable `handoff.csi.dev/attached-nodes`.
//! Every write is a merge patch guarded by the cached resourceVersion; a 409 re-reads
//! the PV and retries with backoff, so a write either lands on the newest object or
//! fails with a retryable error. Nothing is reported as saved that the API server did
//! not accept.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use super::cache::ClusterCache;
use super::{ANNOTATION_NODES, ANNOTATION_STATE};
use crate::attachment::state::AttachmentState;
use crate::attachment::store::{AttachmentStore, StoreError};
use crate::ids::VolumeId;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_millis(50),
            request_timeout: Duration::from_secs(5),
        }
    }
}

pub struct PvStore {
    api: Api<PersistentVolume>,
    cache: Arc<ClusterCache>,
    retry: RetryPolicy,
}

enum Attempt {
    Done,
    /// The object changed since the state was read: the decision must be re-made.
    Stale,
    /// Transient (5xx, 429, timeout, connection): back off and try again.
    Transient(String),
    Gone,
    Fatal(String),
}

impl PvStore {
    pub fn new(api: Api<PersistentVolume>, cache: Arc<ClusterCache>, retry: RetryPolicy) -> Self {
        PvStore { api, cache, retry }
    }

    async fn patch_once(&self, name: &str, rv: &str, annotations: &serde_json::Value) -> Attempt {
        let body = json!({"metadata": {"resourceVersion": rv, "annotations": annotations}});
        let (params, patch) = (PatchParams::default(), Patch::Merge(&body));
        let call = self.api.patch(name, &params, &patch);
        match tokio::time::timeout(self.retry.request_timeout, call).await {
            Err(_) => {
                Attempt::Transient(format!("no answer within {:?}", self.retry.request_timeout))
            }
            Ok(Ok(pv)) => {
                self.cache.observe_pv(&pv);
                Attempt::Done
            }
            Ok(Err(kube::Error::Api(status))) => match status.code {
                409 => Attempt::Stale,
                404 => Attempt::Gone,
                429 | 500..=599 => {
                    Attempt::Transient(format!("{} {}", status.code, status.message))
                }
                _ => Attempt::Fatal(format!("{} {}", status.code, status.message)),
            },
            Ok(Err(e)) => Attempt::Transient(e.to_string()),
        }
    }

    /// Brings the cache up to date with the PV after a conflict, so the next load
    /// decides on what the API server holds.
    async fn refresh(&self, name: &str) {
        if let Ok(Ok(pv)) =
            tokio::time::timeout(self.retry.request_timeout, self.api.get(name)).await
        {
            self.cache.observe_pv(&pv);
        }
    }

    /// Applies `annotations` to the PV of `state`'s volume, guarded by the version the
    /// state was read at (or, for a state never stored, by "no annotation yet").
    async fn write(
        &self,
        state: &AttachmentState,
        annotations: serde_json::Value,
        missing_ok: bool,
    ) -> Result<(), StoreError> {
        let volume = &state.volume_id;
        let Some(pv) = self.cache.wait_pv_for(volume, Duration::from_secs(2)).await else {
            if missing_ok {
                return Ok(());
            }
            return Err(StoreError::Unavailable(format!(
                "no PersistentVolume with volumeHandle {volume} is known yet; retry once it exists"
            )));
        };
        let rv = match &state.stored_version {
            Some(rv) => rv.clone(),
            // Never stored: valid only while the PV still carries no state.
            None if pv.attachment.is_none() => pv.resource_version.clone(),
            None => {
                return Err(StoreError::Stale {
                    object: format!("PersistentVolume {}", pv.name),
                })
            }
        };
        let mut last = String::new();
        for attempt in 0..self.retry.attempts {
            if attempt > 0 {
                tokio::time::sleep(self.retry.base_delay * 2u32.pow(attempt.min(6) - 1)).await;
            }
            match self.patch_once(&pv.name, &rv, &annotations).await {
                Attempt::Done => return Ok(()),
                Attempt::Gone if missing_ok => return Ok(()),
                Attempt::Gone => {
                    return Err(StoreError::Unavailable(format!(
                        "PersistentVolume {} of volume {volume} was deleted",
                        pv.name
                    )))
                }
                Attempt::Stale => {
                    self.refresh(&pv.name).await;
                    return Err(StoreError::Stale {
                        object: format!("PersistentVolume {}", pv.name),
                    });
                }
                Attempt::Transient(msg) => last = msg,
                Attempt::Fatal(msg) => {
                    return Err(StoreError::Unavailable(format!(
                        "patching PersistentVolume {}: {msg}",
                        pv.name
                    )))
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "patching PersistentVolume {} failed {} times, last: {last}",
            pv.name, self.retry.attempts
        )))
    }
}

/// The API server's limit on all of an object's annotations together (keys and values).
pub const ANNOTATIONS_BUDGET: usize = 256 * 1024;
/// From this many read-only nodes on, they are stored as one group of names.
const COMPACT_READERS_FROM: usize = 8;
/// The readable node list names at most this many nodes; past it, a count.
const LISTED_NODES: usize = 32;

/// The record as stored: a ReadOnlyMany volume's many readers, which share their access
/// and flags, are kept as one group (`readers`) of node names instead of one object each
/// — about 3 bytes plus the name per node, so ~2,000 readers fit the annotation budget.
/// Their individual attach times are not kept (the group's earliest is).
pub fn encode(state: &AttachmentState) -> String {
    let mut value = serde_json::to_value(state).expect("attachment state always serialises");
    if state.sharing == crate::capability::Sharing::Rox && state.nodes.len() >= COMPACT_READERS_FROM
    {
        let first = &state.nodes[0];
        let same = |n: &crate::attachment::state::NodeAttachment| {
            !n.fencing && n.readonly == first.readonly && n.access == first.access
        };
        if state.nodes.iter().all(same) {
            let since = state
                .nodes
                .iter()
                .map(|n| n.attached_at)
                .min()
                .expect("nodes");
            let names: Vec<&str> = state.node_ids().map(|n| n.as_str()).collect();
            let obj = value.as_object_mut().expect("state is an object");
            obj.remove("nodes");
            obj.insert(
                "readers".into(),
                json!({"since": since, "readonly": first.readonly, "access": first.access, "nodes": names}),
            );
        }
    }
    value.to_string()
}

/// Reads what `encode` wrote (and every earlier form).
pub fn decode(raw: &str) -> Result<AttachmentState, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_str(raw)?;
    if let Some(obj) = value.as_object_mut() {
        if let Some(group) = obj.remove("readers") {
            let names = group["nodes"].as_array().cloned().unwrap_or_default();
            let nodes: Vec<serde_json::Value> = names
                .into_iter()
                .map(|name| {
                    json!({"node_id": name, "attached_at": group["since"], "readonly": group["readonly"],
                        "access": group["access"]})
                })
                .collect();
            obj.insert("nodes".into(), serde_json::Value::Array(nodes));
        }
    }
    serde_json::from_value(value)
}

/// `handoff.csi.dev/attached-nodes`, for people: the node names, or a count past 32.
fn nodes_annotation(state: &AttachmentState) -> String {
    if state.nodes.len() > LISTED_NODES {
        return format!(
            "{} nodes (read-only); see {ANNOTATION_STATE}",
            state.nodes.len()
        );
    }
    let nodes: Vec<&str> = state.node_ids().map(|n| n.as_str()).collect();
    nodes.join(",")
}

/// The state an annotation holds. An annotation that cannot be read, or that names
/// another volume, quarantines its volume: deciding without it could admit a second
/// writer, so publishes are refused with what to do.
fn parse(pv: &super::cache::PvEntry) -> Result<Option<AttachmentState>, StoreError> {
    let Some(raw) = pv.attachment.as_ref() else {
        return Ok(None);
    };
    let quarantined = |why: String| {
        StoreError::Quarantined {
        volume: pv.volume_id.clone(),
        reason: format!(
            "{why}; inspect it with `kubectl get pv {name} -o yaml`, then remove it (`kubectl annotate pv {name} {ANNOTATION_STATE}-`) and restart the controller, which rebuilds the state from VolumeAttachments",
            name = pv.name
        ),
    }
    };
    match decode(raw) {
        Ok(mut state) if state.volume_id == pv.volume_id => {
            state.stored_version = Some(pv.resource_version.clone());
            Ok(Some(state))
        }
        Ok(state) => Err(quarantined(format!(
            "the attachment annotation of PersistentVolume {} names volume {}",
            pv.name, state.volume_id
        ))),
        Err(e) => Err(quarantined(format!(
            "the attachment annotation of PersistentVolume {} is unreadable ({e})",
            pv.name
        ))),
    }
}

impl PvStore {
    /// The PV of `volume` as the API server holds it now (a GET without resourceVersion
    /// is a quorum read): decisions never rest on a watch cache that may lag.
    async fn read_fresh(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<super::cache::PvEntry>, StoreError> {
        let mut names = self.cache.pv_names_for(volume);
        if names.is_empty() {
            // Just created, or the watch lags: give it a moment, then ask the API server.
            if self
                .cache
                .wait_pv_for(volume, Duration::from_secs(2))
                .await
                .is_none()
            {
                names = self.list_names(volume).await?;
            } else {
                names = self.cache.pv_names_for(volume);
            }
        }
        match names.as_slice() {
            [] => Ok(None),
            [name] => self.get(volume, name).await,
            several => Err(StoreError::Quarantined {
                volume: volume.clone(),
                reason: format!(
                    "PersistentVolumes {} all carry volumeHandle {volume}; the driver keeps one attachment record per volume and will not split it — delete the duplicate PersistentVolume (keep the one bound to the workload's claim)",
                    several.join(", ")
                ),
            }),
        }
    }

    async fn get(
        &self,
        volume: &VolumeId,
        name: &str,
    ) -> Result<Option<super::cache::PvEntry>, StoreError> {
        let call = self.api.get_opt(name);
        let pv = match tokio::time::timeout(self.retry.request_timeout, call).await {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "reading PersistentVolume {name}: no answer within {:?}",
                    self.retry.request_timeout
                )))
            }
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "reading PersistentVolume {name}: {e}"
                )))
            }
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(pv))) => pv,
        };
        self.cache.observe_pv(&pv);
        match self.cache.pv_entry(&pv) {
            Some(entry) if &entry.volume_id == volume => Ok(Some(entry)),
            _ => Ok(None),
        }
    }

    /// PV names carrying `volume`, by a LIST from the API server (rare: a volume the
    /// watch has not shown).
    async fn list_names(&self, volume: &VolumeId) -> Result<Vec<String>, StoreError> {
        let params = kube::api::ListParams::default();
        let call = self.api.list(&params);
        let list = tokio::time::timeout(self.retry.request_timeout * 4, call)
            .await
            .map_err(|_| StoreError::Unavailable("listing PersistentVolumes timed out".into()))?
            .map_err(|e| StoreError::Unavailable(format!("listing PersistentVolumes: {e}")))?;
        Ok(list
            .items
            .iter()
            .filter_map(|pv| {
                let e = self.cache.pv_entry(pv)?;
                (&e.volume_id == volume).then(|| {
                    self.cache.observe_pv(pv);
                    e.name
                })
            })
            .collect())
    }
}

#[async_trait]
impl AttachmentStore for PvStore {
    /// From the cache: for start-up and listings, never for a decision (every decision
    /// loads its volume fresh). Quarantined volumes are logged and left out.
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError> {
        let mut out = Vec::new();
        for pv in self.cache.pvs() {
            if self.cache.pv_names_for(&pv.volume_id).len() > 1 {
                tracing::error!(pv = %pv.name, volume_id = %pv.volume_id, "several PersistentVolumes carry this volumeHandle; the volume is quarantined");
                continue;
            }
            match parse(&pv) {
                Ok(Some(state)) => out.push(state),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(pv = %pv.name, error = %e, "attachment annotation quarantined")
                }
            }
        }
        Ok(out)
    }

    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError> {
        match self.read_fresh(volume).await? {
            Some(pv) => parse(&pv),
            None => Ok(None),
        }
    }

    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError> {
        let json = encode(state);
        let nodes = nodes_annotation(state);
        let others = self
            .cache
            .pv_for(&state.volume_id)
            .map_or(0, |pv| pv.other_annotation_bytes);
        let total =
            ANNOTATION_STATE.len() + json.len() + ANNOTATION_NODES.len() + nodes.len() + others;
        if total > ANNOTATIONS_BUDGET {
            return Err(StoreError::TooLarge(format!(
                "the attachment record of volume {} would make its PersistentVolume's annotations {total} bytes ({} nodes; {others} bytes are other annotations), over the {ANNOTATIONS_BUDGET} bytes the API server accepts; nothing was changed — detach the volume from nodes that no longer need it",
                state.volume_id,
                state.nodes.len()
            )));
        }
        self.write(
            state,
            json!({ANNOTATION_STATE: json, ANNOTATION_NODES: nodes}),
            false,
        )
        .await
    }

    async fn remove(&self, state: &AttachmentState) -> Result<(), StoreError> {
        // A merge patch with null deletes the keys.
        self.write(
            state,
            json!({ANNOTATION_STATE: null, ANNOTATION_NODES: null}),
            true,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::state::NodeAttachment;
    use crate::capability::Sharing;
    use crate::ids::NodeId;

    fn reader(i: usize, fencing: bool) -> NodeAttachment {
        NodeAttachment {
            node_id: NodeId::parse(&format!("node-{i:04}")).unwrap(),
            attached_at: chrono::Utc::now(),
            readonly: true,
            access: None,
            fencing,
        }
    }

    #[test]
    fn many_readers_are_grouped_and_read_back() {
        let mut s =
            AttachmentState::new(VolumeId::generate(), Sharing::Rox, Duration::from_secs(300));
        s.nodes = (0..2000).map(|i| reader(i, false)).collect();
        let raw = encode(&s);
        assert!(
            raw.contains("\"readers\"") && !raw.contains("\"nodes\":[{"),
            "grouped"
        );
        assert!(raw.len() < 40_000, "{} bytes for 2,000 readers", raw.len());
        let back = decode(&raw).unwrap();
        assert_eq!(
            back.node_ids().collect::<Vec<_>>(),
            s.node_ids().collect::<Vec<_>>()
        );
        assert!(back.nodes.iter().all(|n| n.readonly && !n.fencing));
        // A reader being fenced keeps its own record: nothing is grouped.
        s.nodes[7].fencing = true;
        let raw = encode(&s);
        assert!(!raw.contains("\"readers\""));
        assert!(decode(&raw).unwrap().nodes[7].fencing);
        // A few readers, and every other volume, are stored as before.
        s.nodes.truncate(3);
        s.nodes[2].fencing = false;
        assert_eq!(decode(&encode(&s)).unwrap(), s);
    }
}
