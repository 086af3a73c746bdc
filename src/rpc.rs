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

/// The same failure (method, ids, code, message) is logged at WARN once per this window,
/// then at DEBUG: the attacher retries and resyncs every refusal for as long as it lasts.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

fn first_in_window(key: String) -> bool {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static SEEN: OnceLock<parking_lot::Mutex<HashMap<String, Instant>>> = OnceLock::new();
    let now = Instant::now();
    let mut seen = SEEN
        .get_or_init(|| parking_lot::Mutex::new(HashMap::new()))
        .lock();
    if seen.len() > 4096 {
        seen.retain(|_, at| now.duration_since(*at) < REPEAT_WINDOW);
        if seen.len() > 4096 {
            // A flood of distinct failures: forget them rather than grow without bound.
            seen.clear();
        }
    }
    match seen.get(&key) {
        Some(at) if now.duration_since(*at) < REPEAT_WINDOW => false,
        _ => {
            seen.insert(key, now);
            true
        }
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
                let key = format!("{method}|{}|{}|{:?}|{}", for_log(volume_id), for_log(node_id), status.code(), status.message());
                if first_in_window(key) {
                    warn!(code = ?status.code(), message = status.message(), elapsed_ms = elapsed.as_millis() as u64, "failed");
                } else {
                    debug!(code = ?status.code(), message = status.message(), elapsed_ms = elapsed.as_millis() as u64, "failed again (repeat of a failure logged in the last 5 minutes)");
                }
            }
        }
        result.map(Response::new)
    }
    .instrument(span)
    .await
}
