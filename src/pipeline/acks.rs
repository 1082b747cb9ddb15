//! The acknowledgement stage: committed messages are deleted from the queue here, beside the
//! sink's next writes (never before their commit). Acks of consecutive windows are gathered
//! into full `DeleteMessageBatch` calls of ten, so small windows do not multiply the calls;
//! a partial batch waits at most [`ACK_LINGER`].
//!
//! Deletes yield to receives: one call at a time while fewer than [`CATCH_UP_PENDING`] acks
//! wait, so during a backlog the queue service spends itself on receives and rows land sooner;
//! past that, or once the source stops (shutdown, end of a drain), [`CATCH_UP_CONCURRENCY`]
//! calls catch up. A committed message whose delete is late is at worst redelivered, and then
//! dropped as a duplicate by the dedup cache or the unique index.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::summary::Stats;
use super::Stages;
use crate::ack;
use crate::dedup::Fingerprint;
use crate::source::{Ack, SQS_BATCH_LIMIT};

/// How long a partial batch of deletes waits for more acks.
const ACK_LINGER: Duration = Duration::from_millis(20);
/// Delete calls in flight at once while fewer than [`CATCH_UP_PENDING`] acks wait.
const ACK_CONCURRENCY: usize = 1;
/// Delete calls in flight at once when deletes fall [`CATCH_UP_PENDING`] acks behind.
const CATCH_UP_CONCURRENCY: usize = 8;
/// Acks waiting from which deletes run at [`CATCH_UP_CONCURRENCY`]. Each holds its message id
/// and receipt handle (a few hundred bytes), so [`MAX_PENDING`] of them stay within ~20 MiB.
const CATCH_UP_PENDING: usize = 20_000;
/// Most acks gathered before the stage stops taking more (the sink then waits on the channel).
const MAX_PENDING: usize = 2 * CATCH_UP_PENDING;

/// A stored message: deleted, then remembered as committed by the dedup cache.
pub(super) struct Stored {
    pub ack: Ack,
    /// `None` for a cache duplicate (already remembered).
    pub fingerprint: Option<Fingerprint>,
}

impl Stages {
    /// Deletes what `committed` sends until it closes and every delete has ended; catches up
    /// at full speed once `source_stopped` is cancelled.
    pub(super) async fn acknowledge(
        self: Arc<Self>,
        mut committed: mpsc::Receiver<Vec<Stored>>,
        source_stopped: CancellationToken,
    ) {
        let mut pending: VecDeque<Stored> = VecDeque::new();
        let mut deleting = FuturesUnordered::new();
        let mut open = true;
        let mut oldest = Instant::now();
        while open || !pending.is_empty() || !deleting.is_empty() {
            let due = !pending.is_empty()
                && (pending.len() >= SQS_BATCH_LIMIT
                    || !open
                    || oldest.elapsed() >= ACK_LINGER
                    || self.abort.is_cancelled());
            let catch_up = pending.len() >= CATCH_UP_PENDING || !open || source_stopped.is_cancelled();
            let concurrency = match catch_up {
                true => CATCH_UP_CONCURRENCY,
                false => ACK_CONCURRENCY,
            };
            tokio::select! {
                biased;
                Some(()) = deleting.next(), if !deleting.is_empty() => {}
                () = std::future::ready(()), if due && deleting.len() < concurrency => {
                    let batch: Vec<Stored> = pending.drain(..pending.len().min(SQS_BATCH_LIMIT)).collect();
                    if !pending.is_empty() {
                        oldest = Instant::now();
                    }
                    deleting.push(self.delete_batch(batch));
                }
                received = committed.recv(), if open && pending.len() < MAX_PENDING => match received {
                    Some(stored) => {
                        if pending.is_empty() {
                            oldest = Instant::now();
                        }
                        pending.extend(stored);
                    }
                    None => open = false,
                },
                () = tokio::time::sleep_until(oldest + ACK_LINGER), if !pending.is_empty() && !due => {}
                () = self.abort.cancelled(), if !pending.is_empty() && !due => {}
            }
        }
    }

    /// One `DeleteMessageBatch` (with its retries), then the messages leave the pipeline. After
    /// shutdown's grace period the call is given up: the rows are committed, so a redelivery is
    /// only a duplicate the unique index drops.
    async fn delete_batch(&self, batch: Vec<Stored>) {
        let (acks, fingerprints): (Vec<Ack>, Vec<Option<Fingerprint>>) =
            batch.into_iter().map(|stored| (stored.ack, stored.fingerprint)).unzip();
        let deleted = tokio::select! {
            deleted = ack::delete_all(&self.sqs, &self.queue_url, &acks, self.max_backoff) => deleted,
            () = self.abort.cancelled() => ack::Deleted { succeeded: 0, gave_up: acks.len() as u64 },
        };
        self.transform.dedup.mark_committed(fingerprints.into_iter().flatten()).await;
        self.in_flight.release(acks.iter().map(Ack::receipt));
        Stats::add(&self.stats.deleted, deleted.succeeded);
        Stats::add(&self.stats.delete_failures, deleted.gave_up);
    }
}
