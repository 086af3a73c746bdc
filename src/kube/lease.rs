//! The driver's own coordination.k8s.io Lease for background work (the reconciler): only
//! the replica holding it acts. The sidecars' leases elect their own leaders and say
//! nothing about this process. Holding is judged by a local deadline taken before each
//! renewal, so a renewal that hangs or fails stops the work without waiting for the loop.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use crate::attachment::BackgroundGate;

pub const LEASE_NAME: &str = "handoff-csi-background";

pub struct BackgroundLease {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    /// Until when (unix ms, local clock) this replica may act.
    held_until: AtomicI64,
}

fn micro_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

impl BackgroundLease {
    pub fn new(api: Api<Lease>, identity: String, duration: Duration) -> Arc<Self> {
        Arc::new(BackgroundLease {
            api,
            identity,
            duration,
            held_until: AtomicI64::new(0),
        })
    }

    /// One attempt to take or renew the lease; true when this replica holds it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let started = Utc::now();
        let secs = self.duration.as_secs().max(1) as i64;
        let held = match self.api.get_opt(LEASE_NAME).await? {
            None => {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"name": LEASE_NAME},
                    "spec": {
                        "holderIdentity": self.identity,
                        "leaseDurationSeconds": secs,
                        "acquireTime": micro_time(started),
                        "renewTime": micro_time(started),
                        "leaseTransitions": 0,
                    }
                }))
                .expect("a valid Lease");
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => true,
                    Err(kube::Error::Api(e)) if e.code == 409 => false,
                    Err(e) => return Err(e),
                }
            }
            Some(current) => {
                let spec = current.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let renewed = spec
                    .renew_time
                    .as_ref()
                    .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0));
                let lasts =
                    chrono::Duration::seconds(spec.lease_duration_seconds.map_or(secs, i64::from));
                let expired = renewed.is_none_or(|r| r + lasts < started);
                if !mine && !expired {
                    false
                } else {
                    let mut spec = json!({
                        "holderIdentity": self.identity,
                        "leaseDurationSeconds": secs,
                        "renewTime": micro_time(started),
                    });
                    if !mine {
                        spec["acquireTime"] = json!(micro_time(started));
                        spec["leaseTransitions"] = json!(spec_transitions(&current) + 1);
                    }
                    let body = json!({
                        "metadata": {"resourceVersion": current.metadata.resource_version},
                        "spec": spec,
                    });
                    // Guarded by resourceVersion: of two replicas taking an expired
                    // lease at once, one gets 409.
                    match self
                        .api
                        .patch(LEASE_NAME, &PatchParams::default(), &Patch::Merge(&body))
                        .await
                    {
                        Ok(_) => true,
                        Err(kube::Error::Api(e)) if e.code == 409 => false,
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        // Counted from before the request, and short of the full duration: another
        // replica can take over only after the lease expired by the API server's view.
        let until = if held {
            (started + chrono::Duration::milliseconds(self.duration.as_millis() as i64 * 2 / 3))
                .timestamp_millis()
        } else {
            0
        };
        self.held_until.store(until, Ordering::SeqCst);
        Ok(held)
    }

    /// Takes and renews the lease every third of its duration, for as long as the
    /// process runs.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let lease = self.clone();
        tokio::spawn(async move {
            let mut was = false;
            loop {
                let held = match tokio::time::timeout(lease.duration / 3, lease.try_hold()).await {
                    Ok(Ok(held)) => held,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "background lease could not be renewed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!("background lease renewal timed out");
                        false
                    }
                };
                if held != was {
                    tracing::info!(lease = LEASE_NAME, identity = %lease.identity, held, "background lease changed hands");
                    was = held;
                }
                tokio::time::sleep(lease.duration / 3).await;
            }
        })
    }
}

fn spec_transitions(lease: &Lease) -> i32 {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
}

impl BackgroundGate for BackgroundLease {
    fn may_act(&self) -> bool {
        Utc::now().timestamp_millis() < self.held_until.load(Ordering::SeqCst)
    }
}
