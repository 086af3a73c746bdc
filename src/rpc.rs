//! What every RPC handler shares: one tracing span with method, volume and node id,
//! the latency/code metric, and the single conversion of `Error` into a gRPC status.

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::{debug, info_span, warn, Instrument};

use crate::error::Error;
use crate::metrics::Metrics;

/// Ids in spans come from the request: cap their length before they reach a log line.
fn for_log(raw: &str) -> &str {
    match raw.char_indices().nth(64) {
        Some((i, _)) => &raw[..i],
        None => raw,
    }
}

pub async fn handle<T, F>(
    metrics: &Metrics,
    method: &'static str,
    volume_id: &str,
    node_id: &str,
    body: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Error>>,
{
    let span =
        info_span!("rpc", method, volume_id = ?for_log(volume_id), node_id = ?for_log(node_id));
    async move {
        let start = Instant::now();
        let result = body.await.map_err(Status::from);
        let elapsed = start.elapsed();
        match &result {
            Ok(_) => {
                metrics.observe_rpc(method, tonic::Code::Ok, elapsed);
                debug!(elapsed_ms = elapsed.as_millis() as u64, "ok");
            }
            Err(status) => {
                metrics.observe_rpc(method, status.code(), elapsed);
                warn!(code = ?status.code(), message = status.message(), elapsed_ms = elapsed.as_millis() as u64, "failed");
            }
        }
        result.map(Response::new)
    }
    .instrument(span)
    .await
}
