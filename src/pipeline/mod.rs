//! The pipeline, wired as SPEC §1 draws it; [`run`] composes the stages and does nothing else:
//!
//! ```text
//! source::receive ─► dedup::drop_committed ─► mask::stage ─► windows + sink::stage::write ─► acks::delete
//!  (pollers, budget)   (moka TTL cache)         (MASK_CONCURRENCY)  (SINK_CONNECTIONS, one transaction each)   (after commit)
//! ```
//!
//! Every hand-off is bounded, in messages and (by the byte budget) in bytes: a slow sink fills
//! the window, which stalls the mask stage, which fills the poller channel, which stops the
//! pollers receiving. Shutdown stops the pollers; the rest drains (`shutdown.rs`).

mod settings;
mod shutdown;
mod started;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::acks::{self, Acker};
use crate::dedup::{self, Dedup};
use crate::mask::{self, Masking};
use crate::sink::stage::{self as sink_stage, Writer};
use crate::source::{self, Budget};
pub use crate::summary::RunSummary;
use crate::summary::Stats;
pub use settings::{PiiSettings, Settings};
pub use shutdown::shutdown_signal;
use shutdown::Ending;
use started::Started;

/// Errors that stop `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot serve metrics on METRICS_ADDR {addr}: {source}")]
    MetricsAddr { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("--drain did not finish within DRAIN_TIMEOUT_SECS ({timeout_secs} s): {held} messages were still held, and the queue reported {queue}")]
    DrainTimeout { timeout_secs: u64, held: usize, queue: String, summary: Box<RunSummary> },
    #[error("cannot use the database in DATABASE_URL: {0}")]
    Database(crate::sink::SinkError),
    #[error("cannot open the PII vault (PII_KMS_KEY_ID): {0}")]
    Vault(crate::vault::VaultError),
}

/// Runs the pipeline until `shutdown` resolves, or, with `--drain`, until the queue is empty
/// and everything received is committed and deleted (at most `DRAIN_TIMEOUT_SECS`).
/// Returns within the grace period plus a few seconds of `shutdown`, whatever state the
/// database or the queue is in.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<RunSummary, RunError> {
    tokio::pin!(shutdown);
    let Some(started) = Started::start(&settings, &mut shutdown).await? else {
        return Ok(RunSummary::default());
    };
    let stats = Arc::new(Stats::default());
    let in_flight = started.in_flight.clone();
    let budget = Budget::new(settings.max_inflight_bytes);
    let dedup = Dedup::new(settings.dedup_capacity.get(), settings.dedup_ttl);
    let stop_source = CancellationToken::new();
    let abort = CancellationToken::new();
    started.watch_queue(&settings, &stop_source);

    let masking = Arc::new(Masking { masker: settings.masker(), vault: started.vault.clone() });
    let writer = Arc::new(Writer {
        sink: started.sink.clone(),
        stats: stats.clone(),
        max_backoff: settings.retry_max_backoff,
        abort: abort.clone(),
    });
    let acker = Arc::new(Acker {
        sqs: started.sqs.clone(),
        queue_url: settings.receive.queue_url.clone(),
        in_flight: in_flight.clone(),
        dedup: dedup.clone(),
        stats: stats.clone(),
        max_backoff: settings.retry_max_backoff,
        max_ack_lag: acks::max_ack_lag(settings.receive.visibility_timeout),
        abort: abort.clone(),
    });

    let (pollers, received) = source::receive(
        started.sqs.clone(),
        settings.receive.clone(),
        settings.pollers,
        in_flight.clone(),
        budget.clone(),
        stop_source.clone(),
    );
    let fresh = dedup::drop_committed(received, dedup, settings.input_format, in_flight.clone(), stats.clone());
    let masked = mask::stage(fresh, masking, budget, in_flight.clone(), settings.mask_concurrency.get());
    let (writes, written) = sink_stage::write(masked, writer, settings.windows);
    let acknowledged = acks::delete(written, acker.clone(), stop_source.clone());
    let pipeline = async {
        tokio::join!(writes, acknowledged);
    };

    let ending = shutdown::drive(pipeline, shutdown, &settings, &stop_source, &abort, &acker, &pollers).await;
    started.stop().await;
    let summary = RunSummary { sqs_requests: started.requests.by_action(), ..stats.summary() };
    match ending {
        Ending::Done => Ok(summary),
        Ending::DrainTimedOut { held, queue } => Err(RunError::DrainTimeout {
            timeout_secs: settings.drain_timeout.as_secs(),
            held,
            queue,
            summary: Box::new(summary),
        }),
    }
}
