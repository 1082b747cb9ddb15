//! The operations endpoint on METRICS_ADDR: `/metrics`, `/healthz`, `/readyz`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::sink::Sink;
use crate::sqs;

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The dependencies `/readyz` checks.
#[derive(Clone)]
pub struct Probes {
    pub sink: Sink,
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
}

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    probes: Probes,
}

/// Serves the endpoints until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    prometheus: PrometheusHandle,
    probes: Probes,
    stop: CancellationToken,
) {
    let upkeep = prometheus.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(AppState { prometheus, probes });
    let result = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    if let Err(err) = result {
        tracing::error!(error = %err, "metrics endpoint failed");
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.prometheus.render()
}

async fn readiness(State(state): State<AppState>) -> (StatusCode, String) {
    let database = state.probes.sink.ping(PROBE_TIMEOUT);
    let queue = tokio::time::timeout(PROBE_TIMEOUT, sqs::queue_depth(&state.probes.sqs, &state.probes.queue_url));
    let (database_ok, queue) = tokio::join!(database, queue);
    let queue_ok = matches!(queue, Ok(Ok(_)));
    let word = |ok: bool| if ok { "reachable" } else { "unreachable" };
    let body = format!("database: {}\nqueue: {}\n", word(database_ok), word(queue_ok));
    let status = if database_ok && queue_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body)
}
