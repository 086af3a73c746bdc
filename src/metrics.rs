//! Prometheus metrics (an instance, not a global registry, so tests run in parallel)
//! and the HTTP endpoint serving /metrics, /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    rpc_total: IntCounterVec,
    rpc_seconds: HistogramVec,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("handoff_csi".into()), None)
            .expect("static registry prefix is valid");
        let rpc_total = IntCounterVec::new(
            Opts::new("rpc_total", "CSI RPCs handled, by method and gRPC code"),
            &["method", "code"],
        )
        .expect("static metric definition");
        let rpc_seconds = HistogramVec::new(
            HistogramOpts::new("rpc_duration_seconds", "CSI RPC latency by method").buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["method"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(rpc_total.clone()))
            .expect("first registration");
        registry
            .register(Box::new(rpc_seconds.clone()))
            .expect("first registration");
        Metrics {
            registry,
            rpc_total,
            rpc_seconds,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn observe_rpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.rpc_total
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
        self.rpc_seconds
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }

    pub fn rpc_count(&self, method: &str, code: tonic::Code) -> u64 {
        self.rpc_total
            .with_label_values(&[method, &format!("{code:?}")])
            .get()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

async fn metrics(State(m): State<Metrics>) -> String {
    m.render()
}

async fn readyz(State(m): State<Metrics>) -> (StatusCode, &'static str) {
    if m.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

pub fn router(m: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(m)
}

/// Serves the metrics endpoint until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    m: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, router(m))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_metrics_are_rendered() {
        let m = Metrics::new();
        m.observe_rpc("CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        m.observe_rpc("CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        assert_eq!(m.rpc_count("CreateVolume", tonic::Code::Ok), 2);
        let text = m.render();
        assert!(
            text.contains("handoff_csi_rpc_total{code=\"Ok\",method=\"CreateVolume\"} 2"),
            "{text}"
        );
        assert!(text.contains("handoff_csi_rpc_duration_seconds_bucket"));
    }
}
