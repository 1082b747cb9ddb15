//! The acknowledgement stage ([`delete`]): committed messages are deleted from the queue here, beside the
//! sink's next writes (never before their commit). Acks of consecutive windows are gathered
//! into full `DeleteMessageBatch` calls of ten, so small windows do not multiply the calls;
//! a partial batch waits at most `ACK_LINGER`.
//!
//! Deletes yield to receives: one call at a time while they keep up, one more per
//! `ACKS_PER_DELETER` acks waiting (up to `MAX_DELETERS`: long round trips need several), so
//! during a backlog the queue service spends itself on receives and rows land sooner; once
//! `CATCH_UP_PENDING` acks wait or one has waited [`max_ack_lag`], once a receive comes back
//! short of a full batch (the backlog is taken), or once the source stops (shutdown), at least
//! `CATCH_UP_CONCURRENCY` calls catch up. A committed message whose delete is late is at worst
//! redelivered (a crash), and then dropped as a duplicate by the unique index.

pub mod deletes;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dedup::{Dedup, Fingerprint};
use crate::metrics;
use crate::sink::stage::{Stored, Written};
use crate::source::{release_for_redelivery, Ack, InFlight};
use crate::sqs::SQS_BATCH_LIMIT;
use crate::summary::Stats;

/// How long a partial batch of deletes waits for more acks.
const ACK_LINGER: Duration = Duration::from_millis(20);
/// Delete calls in flight at once while deletes keep up.
const ACK_CONCURRENCY: usize = 1;
/// Most delete calls at once: at a 20 ms round trip, ~8 000 messages a second.
const MAX_DELETERS: usize = 16;
/// One more delete call at once for each this many acks waiting (up to `MAX_DELETERS`):
/// at a 20 ms round trip one caller deletes ~500 messages a second.
const ACKS_PER_DELETER: usize = 500;
/// Delete calls in flight at once when deletes fall `CATCH_UP_PENDING` acks behind.
const CATCH_UP_CONCURRENCY: usize = 8;
/// Acks waiting from which deletes run at `CATCH_UP_CONCURRENCY`.
const CATCH_UP_PENDING: usize = 30_000;
/// How long an ack may wait before deletes run at `CATCH_UP_CONCURRENCY`: a quarter of the
/// visibility timeout (15 s by default), at most `MAX_ACK_LAG`, so that while the deletes keep
/// up, committed messages are deleted before they are due for visibility extension (half the
/// timeout after their receive). Until their delete they stay held, so a slower catch-up only
/// costs extension calls. What a crash leaves to redeliver (each a duplicate the unique index
/// drops) is at most `MAX_PENDING` acks, the windows in the channel and the deletes in flight.
pub fn max_ack_lag(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 4).min(MAX_ACK_LAG)
}
/// Longest an ack waits before deletes catch up, whatever the visibility timeout (up to 12 h).
const MAX_ACK_LAG: Duration = Duration::from_secs(30);
/// Acks gathered from which the stage stops taking more windows (the sink then waits on the
/// channel); a whole window is taken at once, so up to `BATCH_MAX_ROWS` - 1 more can wait.
/// Each holds its message id and shares its receipt handle with the in-flight registry: with
/// SQS's receipt handles (up to ~1 KiB) at most ~45 MiB, ~10 MiB against LocalStack's (measured:
/// RSS 33 MiB draining 40 000). They count as in flight on the queue (SQS allows ~120 000 per
/// queue; at that limit its long polls return nothing until deletes bring the count down).
const MAX_PENDING: usize = 40_000;
/// How long releasing abandoned messages may take at shutdown.
const ABANDON_WAIT: Duration = Duration::from_secs(2);

/// What the acknowledgement stage deletes and releases with.
pub struct Acker {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub in_flight: Arc<InFlight>,
    /// Remembers what was deleted, for the dedup stage.
    pub dedup: Dedup,
    pub stats: Arc<Stats>,
    pub max_backoff: Duration,
    /// How long a committed message's delete may wait ([`max_ack_lag`]).
    pub max_ack_lag: Duration,
    /// Cancelled when shutdown's grace period is over: deletes and releases in progress are given up.
    pub abort: CancellationToken,
}

/// The acknowledgement stage: deletes the stored messages of what `written` sends, releases the
/// unstorable and abandoned ones for redelivery, until `written` ends and every call has ended;
/// catches up at full speed once `source_stopped` is cancelled or the backlog is taken.
pub async fn delete(written: impl Stream<Item = Written>, acker: Arc<Acker>, source_stopped: CancellationToken) {
    let mut pending: VecDeque<Stored> = VecDeque::new();
    let mut deleting: FuturesUnordered<BoxFuture<'_, ()>> = FuturesUnordered::new();
    let mut open = true;
    let mut deleters = 0;
    tokio::pin!(written);
    while open || !pending.is_empty() || !deleting.is_empty() {
        let oldest = pending.front().map(|stored| stored.committed_at);
        let waited = oldest.map_or(Duration::ZERO, |at| at.elapsed());
        let due = !pending.is_empty()
            && (pending.len() >= SQS_BATCH_LIMIT || !open || waited >= ACK_LINGER || acker.abort.is_cancelled());
        let catch_up = pending.len() >= CATCH_UP_PENDING
            || waited >= acker.max_ack_lag
            || !open
            || source_stopped.is_cancelled()
            || acker.in_flight.backlog_taken();
        // Deleters grow with the acks waiting: one while deletes keep up (they yield to receives),
        // more as a longer round trip or a backlog leaves acks behind.
        let floor = if catch_up { CATCH_UP_CONCURRENCY } else { ACK_CONCURRENCY };
        let concurrency = (ACK_CONCURRENCY + pending.len() / ACKS_PER_DELETER).clamp(floor, MAX_DELETERS);
        if concurrency != deleters {
            deleters = concurrency;
            metrics::gauge!(metrics::DELETERS).set(deleters as f64);
        }
        let oldest_or_now = oldest.unwrap_or_else(Instant::now);
        tokio::select! {
            biased;
            Some(()) = deleting.next(), if !deleting.is_empty() => {}
            () = std::future::ready(()), if due && deleting.len() < concurrency => {
                let batch: Vec<Stored> = pending.drain(..pending.len().min(SQS_BATCH_LIMIT)).collect();
                deleting.push(Box::pin(acker.delete_batch(batch)));
            }
            received = written.next(), if open && pending.len() < MAX_PENDING => match received {
                Some(Written::Committed { stored, unstorable }) => {
                    pending.extend(stored);
                    if !unstorable.is_empty() {
                        deleting.push(Box::pin(acker.release_unstorable(unstorable)));
                    }
                }
                Some(Written::Abandoned(acks)) => deleting.push(Box::pin(acker.abandon(acks))),
                None => open = false,
            },
            () = tokio::time::sleep_until(oldest_or_now + ACK_LINGER), if !pending.is_empty() && !due => {}
            // Catch up when the oldest ack's lag runs out even if nothing else happens
            // meanwhile (the one call in flight retrying, no new commits).
            () = tokio::time::sleep_until(oldest_or_now + acker.max_ack_lag), if !pending.is_empty() && !catch_up => {}
            () = acker.abort.cancelled(), if !pending.is_empty() && !due => {}
            () = source_stopped.cancelled(), if !catch_up && !pending.is_empty() => {}
        }
    }
}

impl Acker {
    /// One `DeleteMessageBatch` (with its retries), then the messages leave the pipeline. After
    /// shutdown's grace period the call is given up: the rows are committed, so a redelivery is
    /// only a duplicate the unique index drops.
    async fn delete_batch(&self, batch: Vec<Stored>) {
        let (acks, fingerprints): (Vec<Ack>, Vec<Option<Fingerprint>>) =
            batch.into_iter().map(|stored| (stored.ack, stored.fingerprint)).unzip();
        let deleted = tokio::select! {
            deleted = deletes::delete_all(&self.sqs, &self.queue_url, &acks, self.max_backoff) => deleted,
            () = self.abort.cancelled() => deletes::Deleted { succeeded: 0, gave_up: acks.len() as u64 },
        };
        self.dedup.mark_committed(fingerprints.into_iter().flatten());
        self.in_flight.release(acks.iter().map(Ack::receipt));
        Stats::add(&self.stats.deleted, deleted.succeeded);
        Stats::add(&self.stats.delete_failures, deleted.gave_up);
    }

    /// Releases messages not even the quarantine could store, undeleted: visible again at once,
    /// so the queue's redrive policy moves them to the dead-letter queue after its receive count.
    async fn release_unstorable(&self, acks: Vec<Ack>) {
        metrics::error("sink", "gave_up");
        metrics::counter!(metrics::MESSAGES_RELEASED, "reason" => "unstorable").increment(acks.len() as u64);
        Stats::add(&self.stats.released, acks.len() as u64);
        let receipts: Vec<Arc<str>> = acks.into_iter().map(|ack| ack.receipt_handle).collect();
        self.in_flight.release(&receipts);
        tokio::select! {
            () = release_for_redelivery(&self.sqs, &self.queue_url, &receipts) => {}
            () = self.abort.cancelled() => {}
        }
    }

    /// Leaves messages for redelivery after shutdown's grace period: counted as abandoned and
    /// made visible again at once (best effort, bounded), so the next run need not wait out
    /// their visibility timeout.
    pub async fn abandon(&self, acks: Vec<Ack>) {
        let receipts: Vec<Arc<str>> = acks.into_iter().map(|ack| ack.receipt_handle).collect();
        self.abandon_receipts(receipts).await;
    }

    /// [`Acker::abandon`] by receipt handle (what the in-flight registry holds at the end).
    pub async fn abandon_receipts(&self, receipts: Vec<Arc<str>>) {
        Stats::add(&self.stats.abandoned, receipts.len() as u64);
        metrics::counter!(metrics::MESSAGES_RELEASED, "reason" => "shutdown").increment(receipts.len() as u64);
        self.in_flight.release(&receipts);
        let release = release_for_redelivery(&self.sqs, &self.queue_url, &receipts);
        let _ = tokio::time::timeout(ABANDON_WAIT, release).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_wait_a_quarter_of_the_visibility_timeout_and_never_more_than_30_s() {
        assert_eq!(max_ack_lag(Duration::from_secs(60)), Duration::from_secs(15));
        assert_eq!(max_ack_lag(Duration::from_secs(3)), Duration::from_millis(750));
        assert_eq!(max_ack_lag(Duration::from_secs(43_200)), MAX_ACK_LAG);
    }
}
