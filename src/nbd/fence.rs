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
    /// HMAC of (volume, node) under the export key.
    token: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FenceReply {
    connections: usize,
}

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
        let req = FenceRequest {
            volume: volume.to_string(),
            node: node.to_string(),
            token: self.key.fence_token(volume, node),
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
        serde_json::from_str::<FenceReply>(&reply)
            .map(|r| r.connections)
            .map_err(|e| remote(format!("unreadable reply from {}: {e}", self.addr)))
    }
}

struct Endpoint {
    target: Arc<NbdTarget>,
    key: Arc<ExportKey>,
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
    if !ep.key.verify_fence(&volume, &node, &req.token) {
        return (
            StatusCode::FORBIDDEN,
            "fence token does not match the export key\n".into(),
        );
    }
    match ep.target.fence(&volume, &node).await {
        Ok(connections) => (
            StatusCode::OK,
            serde_json::to_string(&FenceReply { connections }).expect("reply serialises"),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// The `/fence` endpoint of a standalone target.
pub fn router(target: Arc<NbdTarget>, key: Arc<ExportKey>) -> Router {
    Router::new()
        .route("/fence", post(fence_handler))
        .with_state(Arc::new(Endpoint { target, key }))
}
