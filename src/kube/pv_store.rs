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

fn parse(pv: &super::cache::PvEntry) -> Option<AttachmentState> {
    let raw = pv.attachment.as_ref()?;
    match serde_json::from_str::<AttachmentState>(raw) {
        Ok(mut state) if state.volume_id == pv.volume_id => {
            state.stored_version = Some(pv.resource_version.clone());
            Some(state)
        }
        Ok(state) => {
            tracing::error!(pv = %pv.name, claims = %state.volume_id, handle = %pv.volume_id,
                "attachment annotation names another volume; ignored, VolumeAttachments decide");
            None
        }
        Err(e) => {
            tracing::error!(pv = %pv.name, error = %e,
                "attachment annotation is unreadable; ignored, VolumeAttachments decide");
            None
        }
    }
}

#[async_trait]
impl AttachmentStore for PvStore {
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError> {
        Ok(self.cache.pvs().iter().filter_map(parse).collect())
    }

    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError> {
        Ok(self.cache.pv_for(volume).as_ref().and_then(parse))
    }

    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError> {
        let json = serde_json::to_string(state).expect("attachment state always serialises");
        let nodes: Vec<&str> = state.node_ids().map(|n| n.as_str()).collect();
        self.write(
            state,
            json!({ANNOTATION_STATE: json, ANNOTATION_NODES: nodes.join(",")}),
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
