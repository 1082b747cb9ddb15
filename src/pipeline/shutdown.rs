//! How `run` ends: the pipeline finishes (a drained queue), or shutdown is asked for (or
//! `--drain` runs out of time). Then the source stops and the rest drains for up to the grace
//! period; past it, writes in progress are cancelled (rolled back) and whatever is still held is
//! left for redelivery, made visible again at once.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Settings;
use crate::acks::Acker;
use crate::sqs;

/// After the grace period, how long cancelled work may take to unwind before `run` returns anyway.
const ABORT_WAIT: Duration = Duration::from_secs(3);
/// How long the pollers, and a queue-depth reading for the drain-timeout error, may take.
const TASKS_WAIT: Duration = Duration::from_secs(2);

/// How the pipeline ended.
pub(super) enum Ending {
    /// Finished, or stopped by shutdown.
    Done,
    /// `--drain` ran out of `DRAIN_TIMEOUT_SECS`: what was still held, and what the queue said.
    DrainTimedOut { held: usize, queue: String },
}

/// Drives `pipeline` until it ends or `shutdown` resolves (or the drain deadline passes), then
/// stops the source and lets the rest drain within the grace period.
pub(super) async fn drive(
    pipeline: impl Future<Output = ()>,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
    settings: &Settings,
    stop_source: &CancellationToken,
    abort: &CancellationToken,
    acker: &Acker,
    pollers: &TaskTracker,
) -> Ending {
    tokio::pin!(pipeline);
    let drain_deadline = async {
        match settings.drain {
            true => tokio::time::sleep(settings.drain_timeout).await,
            false => std::future::pending().await,
        }
    };
    let mut ending = Ending::Done;
    let mut finished = false;
    tokio::select! {
        () = &mut pipeline => finished = true,
        () = shutdown.as_mut() => {
            tracing::info!(grace = ?settings.shutdown_grace, "shutdown requested: stopping pollers, flushing in-flight work");
        }
        () = drain_deadline => {
            let held = acker.in_flight.len();
            let queue = match tokio::time::timeout(TASKS_WAIT, sqs::queue_depth(&acker.sqs, &acker.queue_url)).await {
                Ok(Ok(depth)) => format!("{} visible, {} in flight, {} delayed", depth.visible, depth.in_flight, depth.delayed),
                _ => "nothing (unreachable)".to_owned(),
            };
            tracing::error!(held, %queue, "DRAIN_TIMEOUT_SECS passed; stopping");
            ending = Ending::DrainTimedOut { held, queue };
        }
    }
    stop_source.cancel();
    if !finished && tokio::time::timeout(settings.shutdown_grace, &mut pipeline).await.is_err() {
        abort.cancel();
        if tokio::time::timeout(ABORT_WAIT, &mut pipeline).await.is_err() {
            tracing::warn!("in-flight work did not unwind after cancellation; exiting anyway");
        }
        let left = acker.in_flight.receipts();
        tracing::warn!(left = left.len(), "grace period over; uncommitted messages left for redelivery");
        acker.abandon_receipts(left).await;
    }
    let _ = tokio::time::timeout(TASKS_WAIT, pollers.wait()).await;
    ending
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
