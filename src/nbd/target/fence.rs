//! Fencing a node at the NBD target, wherever the target runs: in the controller's own
//! process, or as `handoff-csi target` on a storage host, reached over HTTP with a request
//! signed by the shared export key.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::authority::ExportKey;
use super::server::{FenceError, NbdTarget};
use crate::ids::{NodeId, VolumeId};

/// Cuts a node off a volume at the target; returns the connections dropped.
#[async_trait]
pub trait Fencer: Send + Sync + 'static {
    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<usize, FenceError>;
}

#[async_trait]
impl Fencer for NbdTarget {
    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<usize, FenceError> {
        NbdTarget::fence(self, volume, node).await
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FenceRequest {
    volume: String,
    node: String,
    /// The controller's clock, nanoseconds: attachments made until then are fenced, and
    /// a request far from the target's clock is refused.
    at: i64,
    /// Fresh per request: a request seen before is refused (no replay).
    nonce: String,
    /// HMAC of all of the above under the export key.
    token: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FenceReply {
    connections: usize,
    nonce: String,
    /// HMAC of (nonce, connections): only the target holding the key can say "done".
    mac: String,
}

/// How far a fence request's time may be from the target's clock.
const FENCE_CLOCK_WINDOW: chrono::Duration = chrono::Duration::seconds(120);
/// Nonces remembered: more than a window's worth of fences.
const NONCES_REMEMBERED: usize = 16 * 1024;

/// A target on another host, fenced through its `/fence` endpoint.
pub struct RemoteFencer {
    /// host:port of the target's fence endpoint.
    addr: String,
    key: Arc<ExportKey>,
}

impl RemoteFencer {
    pub fn new(addr: String, key: Arc<ExportKey>) -> Self {
        RemoteFencer { addr, key }
    }

    async fn post(&self, body: &[u8]) -> std::io::Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(&self.addr).await?;
        let head = format!(
            "POST /fence HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out);
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    }
}

#[async_trait]
impl Fencer for RemoteFencer {
    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<usize, FenceError> {
        let at = chrono::Utc::now();
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let req = FenceRequest {
            volume: volume.to_string(),
            node: node.to_string(),
            at: at.timestamp_nanos_opt().unwrap_or_default(),
            token: self.key.fence_token(volume, node, at, &nonce),
            nonce: nonce.clone(),
        };
        let body = serde_json::to_vec(&req).expect("fence requests serialise");
        let remote = |reason: String| FenceError::Remote {
            volume: volume.clone(),
            node: node.clone(),
            reason,
        };
        let (code, reply) =
            tokio::time::timeout(std::time::Duration::from_secs(40), self.post(&body))
                .await
                .map_err(|_| remote(format!("{} did not answer within 40 s", self.addr)))?
                .map_err(|e| remote(format!("{}: {e}", self.addr)))?;
        if code != 200 {
            return Err(remote(format!(
                "{} answered {code}: {}",
                self.addr,
                reply.trim()
            )));
        }
        let reply = serde_json::from_str::<FenceReply>(&reply)
            .map_err(|e| remote(format!("unreadable reply from {}: {e}", self.addr)))?;
        // An unsigned or mismatched "done" is no fence.
        if reply.nonce != nonce
            || !self
                .key
                .verify_fence_reply(&nonce, reply.connections, &reply.mac)
        {
            return Err(remote(format!(
                "the reply from {} is not signed with the export key for this request",
                self.addr
            )));
        }
        Ok(reply.connections)
    }
}

struct Endpoint {
    target: Arc<NbdTarget>,
    key: Arc<ExportKey>,
    nonces: parking_lot::Mutex<std::collections::VecDeque<String>>,
}

impl Endpoint {
    /// Records `nonce`; false when it was seen before.
    fn fresh(&self, nonce: &str) -> bool {
        let mut seen = self.nonces.lock();
        if seen.iter().any(|n| n == nonce) {
            return false;
        }
        seen.push_back(nonce.to_owned());
        while seen.len() > NONCES_REMEMBERED {
            seen.pop_front();
        }
        true
    }
}

async fn fence_handler(State(ep): State<Arc<Endpoint>>, body: Bytes) -> (StatusCode, String) {
    let Ok(req) = serde_json::from_slice::<FenceRequest>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            "expected {volume, node, token}\n".into(),
        );
    };
    let (Ok(volume), Ok(node)) = (VolumeId::parse(&req.volume), NodeId::parse(&req.node)) else {
        return (
            StatusCode::BAD_REQUEST,
            "malformed volume or node id\n".into(),
        );
    };
    let at = chrono::DateTime::from_timestamp_nanos(req.at);
    if req.nonce.is_empty()
        || req.nonce.len() > 64
        || !ep
            .key
            .verify_fence(&volume, &node, at, &req.nonce, &req.token)
    {
        return (
            StatusCode::FORBIDDEN,
            "fence token does not match the export key\n".into(),
        );
    }
    if (chrono::Utc::now() - at).abs() > FENCE_CLOCK_WINDOW {
        return (
            StatusCode::FORBIDDEN,
            "fence request time is too far from this host's clock (check NTP)\n".into(),
        );
    }
    if !ep.fresh(&req.nonce) {
        return (StatusCode::FORBIDDEN, "fence request replayed\n".into());
    }
    match ep.target.fence_as_of(&volume, &node, at).await {
        Ok(connections) => (
            StatusCode::OK,
            serde_json::to_string(&FenceReply {
                connections,
                mac: ep.key.fence_reply_mac(&req.nonce, connections),
                nonce: req.nonce,
            })
            .expect("reply serialises"),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// The `/fence` endpoint of a standalone target.
pub fn router(target: Arc<NbdTarget>, key: Arc<ExportKey>) -> Router {
    Router::new()
        .route("/fence", post(fence_handler))
        .with_state(Arc::new(Endpoint {
            target,
            key,
            nonces: parking_lot::Mutex::default(),
        }))
}
