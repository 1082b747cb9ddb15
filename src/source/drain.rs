//! Watching the queue: the depth gauge, and `--drain`'s decision that the work is done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::source::InFlight;
use crate::sqs;

/// How often the queue's depth is read (for the gauge), and how often `--drain` checks it
/// (besides at once when the last held message is released: deleted, or left for redelivery).
const QUEUE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often the depth is read while nothing is held: an idle queue costs its long polls and
/// one read a minute (SQS bills each request).
const IDLE_QUEUE_CHECK_INTERVAL: Duration = Duration::from_secs(60);
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How many empty checks in a row `--drain` needs before it stops, and the pause before each
/// confirming one: the queue's counts are approximate, so one reading is not enough; the pause
/// is short because the process exits (the queue is empty) only after the last confirmation.
const DRAIN_CONFIRMATIONS: u32 = 2;
const DRAIN_CONFIRM_INTERVAL: Duration = Duration::from_millis(200);

/// Publishes the queue's depth every [`QUEUE_CHECK_INTERVAL`] while messages are held, every
/// [`IDLE_QUEUE_CHECK_INTERVAL`] otherwise; with `drain`, also stops the source
/// once the queue reports nothing visible, in flight or delayed and nothing received is still held,
/// on several checks in a row. While messages are held the queue cannot be drained, so the drain
/// check skips the call then (counting a large queue is expensive for the SQS emulator), and
/// checks at once when the last one is released.
pub(crate) async fn watch_queue(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    drain: Option<CancellationToken>,
    done: CancellationToken,
) {
    let interval = if drain.is_some() { DRAIN_CHECK_INTERVAL } else { QUEUE_CHECK_INTERVAL };
    let mut confirmations = 0;
    let mut last_read: Option<Instant> = None;
    loop {
        let pause = if confirmations > 0 { DRAIN_CONFIRM_INTERVAL } else { interval };
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            // Only before the first empty reading: a signal left from an emptying during that
            // reading must not cut the confirming pause short.
            () = emptied_after(&in_flight, last_read.map(|at| at + DRAIN_CONFIRM_INTERVAL)), if drain.is_some() && confirmations == 0 => {}
        }
        let gauge_interval = if in_flight.is_empty() { IDLE_QUEUE_CHECK_INTERVAL } else { QUEUE_CHECK_INTERVAL };
        let gauge_due = last_read.is_none_or(|at| at.elapsed() >= gauge_interval);
        let drain_check = drain.is_some() && in_flight.is_empty();
        if !gauge_due && !drain_check {
            confirmations = 0;
            continue;
        }
        let depth = tokio::select! {
            _ = done.cancelled() => return,
            depth = sqs::queue_depth(&client, &queue_url) => depth,
        };
        let empty = match depth {
            Ok(depth) => {
                last_read = Some(Instant::now());
                depth.record();
                depth.is_empty() && in_flight.is_empty()
            }
            Err(err) => {
                tracing::warn!(error = %crate::errors::error_chain(&err), "cannot read queue depth");
                false
            }
        };
        let Some(stop_source) = &drain else { continue };
        confirmations = if empty { confirmations + 1 } else { 0 };
        if confirmations >= DRAIN_CONFIRMATIONS {
            tracing::info!("queue drained");
            stop_source.cancel();
            return;
        }
    }
}

/// The release of the last held message, but no sooner than `earliest`: a trickle that empties
/// the registry again and again reads the queue at most once per [`DRAIN_CONFIRM_INTERVAL`].
async fn emptied_after(in_flight: &InFlight, earliest: Option<Instant>) {
    in_flight.emptied().await;
    if let Some(earliest) = earliest {
        tokio::time::sleep_until(earliest.into()).await;
    }
}
