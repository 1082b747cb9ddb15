//! The operations endpoint on METRICS_ADDR: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
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
/// How long a readiness answer is reused: probes from many pollers cost one check.
const READINESS_CACHE: Duration = Duration::from_secs(1);
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 32;
/// Longest a client may take to send a request's headers (slow or silent clients are dropped).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, idle keep-alive included.
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);

/// The dependencies `/readyz` checks.
#[derive(Clone)]
pub struct Probes {
    pub sink: Sink,
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    /// The source's registry: how the last receive went.
    pub in_flight: Arc<crate::source::InFlight>,
}

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    probes: Probes,
    /// The last readiness answer and when it was made; the lock lets one check run at a time.
    readiness: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Readiness)>>>,
}

/// What `/readyz` found.
#[derive(Clone, Copy)]
struct Readiness {
    database_reachable: bool,
    database_writable: bool,
    queue_reachable: bool,
}

/// Binds `addr` and returns the server, which serves the endpoints until `stop` is cancelled.
pub async fn start(
    addr: std::net::SocketAddr,
    prometheus: PrometheusHandle,
    probes: Probes,
    stop: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving /metrics, /healthz, /readyz");
    Ok(serve(listener, prometheus, probes, stop))
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
    let state = AppState { prometheus, probes, readiness: Arc::default() };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(state);
    accept_loop(listener, app, stop).await;
}

/// Serves each connection with HTTP/1 under [`HEADER_READ_TIMEOUT`] and [`CONNECTION_MAX_AGE`],
/// at most [`MAX_CONNECTIONS`] at once, until `stop` is cancelled.
async fn accept_loop(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_MAX_AGE, connection) => {}
                () = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.prometheus.render()
}

async fn readiness(State(state): State<AppState>) -> (StatusCode, String) {
    let ready = {
        let mut last = state.readiness.lock().await;
        match *last {
            Some((at, ready)) if at.elapsed() < READINESS_CACHE => ready,
            _ => {
                let ready = check(&state.probes).await;
                *last = Some((tokio::time::Instant::now(), ready));
                ready
            }
        }
    };
    let database = match (ready.database_reachable, ready.database_writable) {
        (false, _) => "unreachable",
        (true, false) => "not taking writes",
        (true, true) => "reachable",
    };
    let queue = if ready.queue_reachable { "reachable" } else { "unreachable" };
    let ok = ready.database_reachable && ready.database_writable && ready.queue_reachable;
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, format!("database: {database}\nqueue: {queue}\n"))
}

/// Checks the database (reachable, and not found refusing writes by the sink) and the queue.
async fn check(probes: &Probes) -> Readiness {
    let database = probes.sink.ping(PROBE_TIMEOUT);
    // The pollers' last receive says whether the queue answers; asked only before the first.
    let queue = async {
        match probes.in_flight.queue_answered() {
            Some(answered) => answered,
            None => matches!(
                tokio::time::timeout(PROBE_TIMEOUT, sqs::queue_depth(&probes.sqs, &probes.queue_url)).await,
                Ok(Ok(_))
            ),
        }
    };
    let (database_reachable, queue_reachable) = tokio::join!(database, queue);
    Readiness { database_reachable, database_writable: probes.sink.is_writable(), queue_reachable }
}
