//! Source: concurrent long-polling receivers, the registry of messages held, the
//! visibility extender that keeps held messages from being redelivered, and the byte budget.

pub mod budget;
pub mod drain;
pub mod envelope;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{ChangeMessageVisibilityBatchRequestEntry, Message, MessageSystemAttributeName};
use aws_sdk_sqs::Client;
use chrono::{DateTime, Utc};
use futures::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics;
use crate::retry::Retry;
use crate::sqs::SQS_BATCH_LIMIT;
pub use budget::{Budget, Share};

/// Visibility-extension calls in flight at once: thousands of held messages are
/// hundreds of calls, which must all finish well within one visibility timeout.
const EXTENSION_CONCURRENCY: usize = 16;
/// Longest pause between two rounds of visibility extension.
const EXTENSION_TICK_MAX: Duration = Duration::from_secs(5);

/// How long a stopping poller waits for its long poll in flight, and for releasing what it brought.
const RECEIVE_AFTER_STOP: Duration = Duration::from_secs(1);

/// What is needed to delete a message once it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub message_id: String,
    /// Shared with the in-flight registry, which keys its entry by it.
    pub receipt_handle: Arc<str>,
}

impl Ack {
    /// The receipt handle, as the in-flight registry keys it.
    pub fn receipt(&self) -> &str {
        &self.receipt_handle
    }
}

/// One received message. `body` may hold raw PII: it is never logged.
pub struct Envelope {
    pub ack: Ack,
    pub body: String,
    /// The `SentTimestamp` attribute, the event time (the body carries none).
    pub sent_at: DateTime<Utc>,
    /// The body's share of the byte budget, returned when the message leaves the pipeline.
    pub share: Option<Share>,
    /// It carries a copy attribute whose id is not an SQS message id: quarantined as `invalid_envelope`.
    pub forged_copy_id: bool,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("ack", &self.ack)
            .field("body_len", &self.body.len())
            .field("sent_at", &self.sent_at)
            .finish()
    }
}

impl Envelope {
    /// Builds an envelope from an SQS message, or `None` when it has no receipt handle
    /// (it could never be deleted; SQS redrives it to the dead-letter queue).
    pub fn from_message(message: Message, now: DateTime<Utc>) -> Option<Envelope> {
        let receipt_handle = message.receipt_handle?;
        let sent_at = message
            .attributes
            .as_ref()
            .and_then(|attrs| attrs.get(&MessageSystemAttributeName::SentTimestamp))
            .and_then(|millis| millis.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(now);
        // A copy `loginflow redrive` made keeps its original id, so it is stored only once. Anyone
        // can send that attribute: only an SQS message id's shape is taken; anything else marks
        // the message to be quarantined under its own id.
        let copy_of = message
            .message_attributes
            .as_ref()
            .and_then(|attributes| attributes.get(crate::sqs::ORIGINAL_ID_ATTRIBUTE))
            .map(|value| value.string_value().and_then(envelope::issued_id));
        let forged_copy_id = matches!(copy_of, Some(None));
        let message_id = match copy_of.flatten() {
            Some(original) => original,
            None => message.message_id.unwrap_or_else(|| format!("receipt:{receipt_handle}")),
        };
        let body = message.body.unwrap_or_default();
        let ack = Ack { message_id, receipt_handle: receipt_handle.into() };
        Some(Envelope { ack, body, sent_at, share: None, forged_copy_id })
    }
}

/// Messages received and not yet deleted, keyed by receipt handle; whether the last receive
/// came back short of a full batch; and a signal for when the last held message is released.
#[derive(Debug, Default)]
pub struct InFlight {
    // foldhash, not SipHash: every message's handle (hundreds of bytes) is hashed on hold and
    // on release, and the handles come from SQS, not from whoever sends messages.
    held: Mutex<HashMap<Arc<str>, Instant, foldhash::fast::RandomState>>,
    backlog_taken: AtomicBool,
    /// When the last receive came back, and whether it was an answer (not an error).
    last_receive: Mutex<Option<(Instant, bool)>>,
    emptied: tokio::sync::Notify,
}

impl InFlight {
    /// Whether the last receive (of any poller) came back with fewer than [`SQS_BATCH_LIMIT`]
    /// messages: the queue had no more to give, so there is no backlog for deletes to yield to.
    /// (An empty receive comes back only after a whole long poll, too late to be the signal.)
    pub fn backlog_taken(&self) -> bool {
        self.backlog_taken.load(Ordering::Relaxed)
    }

    fn received(&self, messages: usize) {
        self.backlog_taken.store(messages < SQS_BATCH_LIMIT, Ordering::Relaxed);
        *self.last_receive.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), true));
    }

    fn receive_failed(&self) {
        *self.last_receive.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), false));
    }

    /// Whether the queue answered the last receive, if one came back within [`RECEIVE_EVIDENCE`]
    /// (`None` otherwise: before the first, or while pollers wait on the budget): the readiness
    /// check reads this rather than asking SQS, so probes cost no requests while receives run.
    pub fn queue_answered(&self) -> Option<bool> {
        let last = *self.last_receive.lock().unwrap_or_else(|e| e.into_inner());
        last.filter(|(at, _)| at.elapsed() < RECEIVE_EVIDENCE).map(|(_, answered)| answered)
    }

    /// Leaves a batch whose `step` panicked (a bug, not bad data) for redelivery, and at last the
    /// DLQ: counted, logged without the panic's message (it may quote body text), and released so
    /// its visibility is no longer extended.
    pub fn give_up_after_panic(&self, step: &str, receipts: &[Arc<str>]) {
        metrics::error("decode", "gave_up");
        tracing::error!(
            step,
            messages = receipts.len(),
            "a receive batch's processing panicked; messages left for redelivery"
        );
        self.release(receipts);
    }

    /// Records newly received messages (their visibility clock starts now).
    pub fn hold(&self, receipts: impl IntoIterator<Item = impl Into<Arc<str>>>) {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.extend(receipts.into_iter().map(|r| (r.into(), now)));
        metrics::gauge!(metrics::INFLIGHT_MESSAGES).set(held.len() as f64);
    }

    /// Forgets messages that were deleted, or that will be redelivered.
    pub fn release(&self, receipts: impl IntoIterator<Item = impl AsRef<str>>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let before = held.len();
        for receipt in receipts {
            held.remove(receipt.as_ref());
        }
        let after = held.len();
        drop(held);
        metrics::gauge!(metrics::INFLIGHT_MESSAGES).set(after as f64);
        if after == 0 && before > 0 {
            self.emptied.notify_one();
        }
    }

    /// Resolves once a release has left nothing held (at once if one did since the last call,
    /// even if messages have been received since: the caller checks [`Self::is_empty`]).
    pub async fn emptied(&self) {
        self.emptied.notified().await;
    }

    /// The receipt handles of every message held.
    pub fn receipts(&self) -> Vec<Arc<str>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Number of messages held.
    pub fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Receipts whose visibility was last set more than `older_than` ago.
    fn due(&self, older_than: Duration) -> Vec<Arc<str>> {
        let now = Instant::now();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter().filter(|(_, since)| now.duration_since(**since) >= older_than).map(|(r, _)| r.clone()).collect()
    }

    /// Restarts the visibility clock of messages whose extension succeeded at `at`
    /// (only those still held: a message deleted meanwhile stays forgotten).
    fn extended(&self, receipts: impl IntoIterator<Item = impl AsRef<str>>, at: Instant) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for receipt in receipts {
            if let Some(since) = held.get_mut(receipt.as_ref()) {
                *since = at;
            }
        }
    }
}

/// Settings of one receiver.
#[derive(Debug, Clone)]
pub struct ReceiveSettings {
    pub queue_url: String,
    /// Long-poll wait per receive (`RECEIVE_WAIT_SECS`, 1..=20 s).
    pub wait: Duration,
    /// Visibility timeout requested on receive, and the length of each extension.
    pub visibility_timeout: Duration,
    pub max_backoff: Duration,
}

/// How many pollers run: from `min`, one more while every poller's last receive came back full
/// and the last one added throughput ([`Ramp`]), up to `max`; a poller whose long poll comes back
/// empty retires while more than `min` run. `POLLERS` pins both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollerRange {
    pub min: usize,
    pub max: usize,
}

/// How long a receive's outcome says whether the queue answers: a long poll (up to 20 s) plus an
/// SDK attempt's timeout (30 s) and some.
const RECEIVE_EVIDENCE: Duration = Duration::from_secs(60);

/// Messages in flight on the queue past which no poller is added: SQS refuses receives past
/// 120 000 in flight per queue, and every replica counts against that.
const IN_FLIGHT_CEILING: usize = 60_000;

/// The source stage: long-polling receivers, as many as [`PollerRange`] allows, each handing its
/// receive batches on as they come. The stream ends once `stop` is cancelled and every poller has
/// returned.
pub fn receive(
    client: Client,
    settings: ReceiveSettings,
    range: PollerRange,
    in_flight: Arc<InFlight>,
    budget: Budget,
    stop: CancellationToken,
) -> (TaskTracker, ReceiverStream<Vec<Envelope>>) {
    let range = PollerRange { min: range.min.max(1), max: range.max.max(range.min.max(1)) };
    let (out, received) = mpsc::channel((2 * range.max).min(64));
    let pollers = Arc::new(Pollers {
        client,
        settings,
        in_flight,
        budget,
        out,
        stop,
        tasks: TaskTracker::new(),
        range,
        active: AtomicUsize::new(0),
        full: AtomicUsize::new(0),
        ramp: Mutex::default(),
    });
    for _ in 0..range.min {
        pollers.clone().add();
    }
    pollers.tasks.close();
    (pollers.tasks.clone(), ReceiverStream::new(received))
}

/// The running pollers and what they share.
struct Pollers {
    client: Client,
    settings: ReceiveSettings,
    in_flight: Arc<InFlight>,
    budget: Budget,
    out: mpsc::Sender<Vec<Envelope>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    range: PollerRange,
    /// Pollers running.
    active: AtomicUsize,
    /// Pollers whose last receive came back full.
    full: AtomicUsize,
    /// Whether another poller adds throughput.
    ramp: Mutex<Ramp>,
}

/// How the pollers' throughput answers to their number, from the round trips of full receives (a
/// backlog answers at once, so their time is the service's and the network's): `n` pollers whose
/// receives take `t` on average bring `n / t` receives a second. A poller is added while each one
/// brings at least a quarter of what it would if the service kept up (`1/n` more; it does when
/// the round trips stay put, as SQS's do at ~20 ms). When one does not, twice in a row (an
/// emulator on one core, whose round trips grow with every poller), it retires and none is added
/// for [`Ramp::HOLD`]. Vector's adaptive concurrency does the same with a sink's response times.
#[derive(Debug, Default)]
struct Ramp {
    /// Pollers running while `samples` were taken.
    level: usize,
    samples: u32,
    total: Duration,
    /// The last level measured, and the receives a second it brought.
    last: Option<(usize, f64)>,
    /// No poller is added before this (after one did not pay).
    hold_until: Option<Instant>,
    /// Measurements in a row at this level that fell short of the gain (one may be noise).
    misses: u8,
}

/// What a poller does after a full receive.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Stay,
    Grow,
    Retire,
}

impl Ramp {
    /// How long no poller is added after one did not add throughput.
    const HOLD: Duration = Duration::from_secs(5);
    /// The share of a perfect gain (`1/n`) another poller must bring to stay (a quarter: noise in the
    /// round trips is smaller than that, a saturated service gains nothing).
    const GAIN: f64 = 0.25;

    /// Records a full receive's round trip with `active` pollers running.
    fn record(&mut self, round_trip: Duration, active: usize, now: Instant) -> Step {
        if self.level != active {
            (self.level, self.samples, self.total, self.misses) = (active, 0, Duration::ZERO, 0);
        }
        self.samples += 1;
        self.total += round_trip;
        if self.samples < active as u32 {
            return Step::Stay;
        }
        let average = self.total.as_secs_f64() / f64::from(self.samples);
        let throughput = active as f64 / average.max(1e-6);
        (self.samples, self.total) = (0, Duration::ZERO);
        let paid = match self.last {
            Some((level, before)) if level < active => {
                throughput >= before * (1.0 + Ramp::GAIN * (active - level) as f64 / level as f64)
            }
            _ => true,
        };
        if !paid {
            self.misses += 1;
            if self.misses < 2 {
                return Step::Stay;
            }
            self.hold_until = Some(now + Ramp::HOLD);
            self.last = None;
            return Step::Retire;
        }
        self.last = Some((active, throughput));
        match self.hold_until {
            Some(until) if now < until => Step::Stay,
            _ => Step::Grow,
        }
    }
}

impl Pollers {
    /// Starts one more poller (the caller has checked the range).
    fn add(self: Arc<Self>) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.count();
        self.seat();
    }

    /// Publishes how many pollers run.
    fn count(&self) {
        metrics::gauge!(metrics::POLLERS).set(self.active.load(Ordering::Relaxed) as f64);
    }

    /// Runs a poller in a place already counted in `active`.
    fn seat(self: Arc<Self>) {
        let tasks = self.tasks.clone();
        tasks.spawn(receive_loop(Seat { pollers: self, full: false, seated: true }));
    }

    /// After a full receive that took `round_trip`: one more poller when every poller's last receive
    /// was full, the last one added throughput ([`Ramp`]), the range allows it, and the queue's
    /// in-flight limit is far off. [`Step::Retire`] when the last one did not pay: the caller retires.
    fn after_full_receive(self: &Arc<Self>, round_trip: Duration) -> Step {
        let active = self.active.load(Ordering::Relaxed);
        let step = self.ramp.lock().unwrap_or_else(|e| e.into_inner()).record(round_trip, active, Instant::now());
        if step == Step::Grow {
            self.grow();
        }
        step
    }

    fn grow(self: &Arc<Self>) {
        if self.stop.is_cancelled() || self.in_flight.len() >= IN_FLIGHT_CEILING {
            return;
        }
        let full = self.full.load(Ordering::Relaxed);
        let grown = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| (a < self.range.max && full >= a).then_some(a + 1));
        if grown.is_ok() {
            self.count();
            self.clone().seat();
        }
    }

    /// Takes one poller off the count if more than `min` run; whether it did.
    fn retire(&self) -> bool {
        let retired =
            self.active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| (a > self.range.min).then(|| a - 1));
        self.count();
        retired.is_ok()
    }
}

/// One poller's place among the running ones, given up when it ends.
struct Seat {
    pollers: Arc<Pollers>,
    /// Whether its last receive came back full.
    full: bool,
    /// Whether it still counts as running (a retired poller gave its place up already).
    seated: bool,
}

impl Seat {
    /// Gives up its place if more than `min` pollers run; whether it did (the poller then ends).
    fn retire(&mut self) -> bool {
        if self.seated && self.pollers.retire() {
            self.seated = false;
            // No longer one of the pollers whose last receive was full, while it hands on its batch.
            self.received(0);
        }
        !self.seated
    }

    fn received(&mut self, messages: usize) {
        let full = messages >= SQS_BATCH_LIMIT;
        if full != self.full {
            match full {
                true => self.pollers.full.fetch_add(1, Ordering::Relaxed),
                false => self.pollers.full.fetch_sub(1, Ordering::Relaxed),
            };
            self.full = full;
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.received(0);
        if self.seated {
            self.pollers.active.fetch_sub(1, Ordering::Relaxed);
            self.pollers.count();
        }
    }
}

/// One long-polling receiver: receives up to 10 messages at a time and hands each batch to `out`.
/// Waiting on the byte budget or on a full `out` is the back-pressure that keeps memory
/// bounded. Returns when `stop` is cancelled (at once while it waits on the budget, the queue or
/// `out`), `out` is closed, or it retires after an empty long poll; a batch it could not hand
/// over is made visible again at once.
async fn receive_loop(mut seat: Seat) {
    let pollers = seat.pollers.clone();
    let Pollers { client, settings, in_flight, budget, out, stop, .. } = &*pollers;
    let mut retry = Retry::new("source", settings.max_backoff);
    loop {
        let reservation = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            reservation = budget.reserve_batch() => reservation,
        };
        let request = client
            .receive_message()
            .queue_url(&settings.queue_url)
            .max_number_of_messages(SQS_BATCH_LIMIT as i32)
            .wait_time_seconds(settings.wait.as_secs() as i32)
            .visibility_timeout(settings.visibility_timeout.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names(crate::sqs::ORIGINAL_ID_ATTRIBUTE)
            .send();
        tokio::pin!(request);
        let asked = Instant::now();
        let result = tokio::select! {
            result = &mut request => result,
            _ = stop.cancelled() => {
                // A long poll in flight may still bring messages: made visible again at once, not
                // left invisible until their timeout (a poll that brings none is dropped after the wait).
                if let Ok(Ok(output)) = tokio::time::timeout(RECEIVE_AFTER_STOP, request).await {
                    let receipts: Vec<Arc<str>> =
                        output.messages.unwrap_or_default().into_iter().filter_map(|m| m.receipt_handle.map(Arc::from)).collect();
                    release_at_stop(client, &settings.queue_url, &receipts).await;
                }
                return;
            }
        };
        let messages = match result {
            Ok(output) => {
                retry.succeeded();
                output.messages.unwrap_or_default()
            }
            Err(err) => {
                in_flight.receive_failed();
                match retry.after_failure(&err, "receive", Some(stop)).await {
                    Ok(()) => continue,
                    Err(_) => return,
                }
            }
        };
        in_flight.received(messages.len());
        seat.received(messages.len());
        if messages.is_empty() {
            if seat.retire() {
                return;
            }
            continue;
        }
        // A poller that retires still hands on the batch it holds.
        let retiring = seat.full && pollers.after_full_receive(asked.elapsed()) == Step::Retire && seat.retire();
        let now = Utc::now();
        let mut batch: Vec<Envelope> = messages.into_iter().filter_map(|m| Envelope::from_message(m, now)).collect();
        metrics::counter!(metrics::MESSAGES_RECEIVED).increment(batch.len() as u64);
        in_flight.hold(batch.iter().map(|e| e.ack.receipt_handle.clone()));
        let sizes: Vec<usize> = batch.iter().map(|e| e.body.len()).collect();
        let shares = budget.shares_for(reservation, sizes).await;
        for (envelope, share) in batch.iter_mut().zip(shares) {
            envelope.share = Some(share);
        }
        let receipts: Vec<Arc<str>> = batch.iter().map(|e| e.ack.receipt_handle.clone()).collect();
        let sent = tokio::select! {
            _ = stop.cancelled() => false,
            sent = out.send(batch) => sent.is_ok(),
        };
        if !sent {
            // Never stored, and nothing downstream will take them: visible again at once.
            in_flight.release(&receipts);
            release_at_stop(client, &settings.queue_url, &receipts).await;
            return;
        }
        if retiring {
            return;
        }
    }
}

/// Keeps held messages invisible: messages held for more than half the visibility timeout
/// get a fresh full timeout (ChangeMessageVisibilityBatch, [`EXTENSION_CONCURRENCY`] calls at
/// a time). A message's clock restarts only when its extension succeeds, so a failed one is
/// retried on the next round, within the same timeout.
pub async fn extend_visibility(
    client: Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    visibility_timeout: Duration,
    stop: CancellationToken,
) {
    let period = (visibility_timeout / 8).clamp(Duration::from_millis(100), EXTENSION_TICK_MAX);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let due = in_flight.due(visibility_timeout / 2);
        let seconds = visibility_timeout.as_secs() as i32;
        // Built up front: a lazily mapped stream would hold a closure over borrowed chunks,
        // which keeps the future from being `Send`.
        let calls: Vec<_> =
            due.chunks(SQS_BATCH_LIMIT).map(|chunk| change_visibility(&client, &queue_url, chunk, seconds)).collect();
        let mut round = stream::iter(calls).buffer_unordered(EXTENSION_CONCURRENCY);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = round.next() => next,
            };
            let Some((started, extended)) = next else { break };
            in_flight.extended(&extended, started);
        }
    }
}

/// [`release_for_redelivery`] of messages received after the stop began, counted as released
/// at shutdown; bounded, so a stalled queue service cannot hold the stop.
async fn release_at_stop(client: &Client, queue_url: &str, receipts: &[Arc<str>]) {
    if receipts.is_empty() {
        return;
    }
    metrics::counter!(metrics::MESSAGES_RELEASED, "reason" => "shutdown").increment(receipts.len() as u64);
    let _ = tokio::time::timeout(RECEIVE_AFTER_STOP, release_for_redelivery(client, queue_url, receipts)).await;
}

/// Makes messages visible again at once, so the queue redelivers them (and, past the redrive
/// policy's receive count, moves them to the dead-letter queue). Best effort: a message whose
/// call fails comes back when its visibility timeout ends anyway.
pub async fn release_for_redelivery(client: &Client, queue_url: &str, receipts: &[Arc<str>]) {
    let calls: Vec<_> =
        receipts.chunks(SQS_BATCH_LIMIT).map(|chunk| change_visibility(client, queue_url, chunk, 0)).collect();
    let mut calls = stream::iter(calls).buffer_unordered(EXTENSION_CONCURRENCY);
    while calls.next().await.is_some() {}
}

/// One ChangeMessageVisibilityBatch call; returns when it started and the receipts it changed.
async fn change_visibility(
    client: &Client,
    queue_url: &str,
    chunk: &[Arc<str>],
    seconds: i32,
) -> (Instant, Vec<Arc<str>>) {
    let started = Instant::now();
    let entries = chunk.iter().enumerate().filter_map(|(i, receipt)| {
        ChangeMessageVisibilityBatchRequestEntry::builder()
            .id(i.to_string())
            .receipt_handle(&**receipt)
            .visibility_timeout(seconds)
            .build()
            .ok()
    });
    let result =
        client.change_message_visibility_batch().queue_url(queue_url).set_entries(Some(entries.collect())).send().await;
    let changed: Vec<Arc<str>> = match result {
        Ok(out) => {
            // A failed entry is usually a message deleted meanwhile; a held one is retried next round.
            let failed: Vec<&str> = out.failed.iter().map(|f| f.id.as_str()).collect();
            chunk
                .iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(&i.to_string().as_str()))
                .map(|(_, r)| r.clone())
                .collect()
        }
        Err(err) => {
            metrics::error("visibility", "transient");
            tracing::warn!(error = %crate::errors::error_chain(&err), messages = chunk.len(), "visibility change failed; retrying next round");
            Vec::new()
        }
    };
    metrics::counter!(metrics::VISIBILITY_EXTENSIONS, "outcome" => "success").increment(changed.len() as u64);
    metrics::counter!(metrics::VISIBILITY_EXTENSIONS, "outcome" => "failure")
        .increment((chunk.len() - changed.len()) as u64);
    (started, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::FutureExt;
    use std::collections::HashMap;

    #[test]
    fn pollers_are_added_while_each_adds_throughput() {
        let mut ramp = Ramp::default();
        let now = Instant::now();
        let ms = Duration::from_millis;
        // 20 ms round trips whatever the number of pollers (SQS keeps up): keep adding.
        // One round of receives per measurement.
        assert_eq!(ramp.record(ms(20), 1, now), Step::Grow);
        let steps: Vec<Step> = (0..2).map(|_| ramp.record(ms(21), 2, now)).collect();
        assert_eq!(steps, [Step::Stay, Step::Grow]);
        // With a third the round trips grow in proportion (a saturated service): it retires, and none is added for a while.
        let steps: Vec<Step> = (0..6).map(|_| ramp.record(ms(32), 3, now)).collect();
        assert_eq!(
            steps,
            [Step::Stay, Step::Stay, Step::Stay, Step::Stay, Step::Stay, Step::Retire],
            "after two misses"
        );
        let steps: Vec<Step> = (0..2).map(|_| ramp.record(ms(21), 2, now + ms(100))).collect();
        assert_eq!(steps.last(), Some(&Step::Stay), "held");
        let steps: Vec<Step> = (0..2).map(|_| ramp.record(ms(21), 2, now + Ramp::HOLD + ms(200))).collect();
        assert_eq!(steps.last(), Some(&Step::Grow), "tried again after the hold");
    }

    #[test]
    fn envelope_uses_sent_timestamp_and_tolerates_missing_parts() {
        let now = Utc::now();
        let message = Message::builder()
            .message_id("m-1")
            .receipt_handle("r-1")
            .body("{}")
            .set_attributes(Some(HashMap::from([(
                MessageSystemAttributeName::SentTimestamp,
                "1700000000123".to_string(),
            )])))
            .build();
        let envelope = Envelope::from_message(message, now).unwrap();
        assert_eq!(envelope.sent_at.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(envelope.ack.message_id, "m-1");

        let bare = Message::builder().receipt_handle("r-2").build();
        let envelope = Envelope::from_message(bare, now).unwrap();
        assert_eq!(envelope.sent_at, now);
        assert_eq!(envelope.body, "");
        assert!(Envelope::from_message(Message::builder().message_id("x").build(), now).is_none());
    }

    #[test]
    fn in_flight_tracks_and_schedules_extensions() {
        let in_flight = InFlight::default();
        let series = crate::metrics::tests::capture(|| in_flight.hold(["a", "b"]));
        assert_eq!(
            crate::metrics::tests::value_of(&series, metrics::INFLIGHT_MESSAGES, &[]),
            Some(&metrics_util::debugging::DebugValue::Gauge(2.0.into()))
        );
        assert_eq!(in_flight.len(), 2);
        let due = |older_than| {
            let mut due: Vec<String> = in_flight.due(older_than).iter().map(|r| r.to_string()).collect();
            due.sort();
            due
        };
        assert_eq!(due(Duration::from_secs(60)), Vec::<String>::new());
        assert_eq!(due(Duration::ZERO), ["a", "b"]);
        // Only a successful extension restarts the clock: "b" failed and stays due.
        std::thread::sleep(Duration::from_millis(30));
        in_flight.extended(["a"], Instant::now());
        assert_eq!(due(Duration::from_millis(20)), ["b"]);
        in_flight.release(["a", "b"]);
        assert!(in_flight.is_empty());
        // The release that emptied it left a signal for `--drain`'s watcher, which was not waiting yet.
        assert!(in_flight.emptied().now_or_never().is_some());
        assert!(in_flight.emptied().now_or_never().is_none(), "one signal per emptying");
        in_flight.release(["a"]);
        assert!(in_flight.emptied().now_or_never().is_none(), "releasing nothing held is no emptying");
        // Only the last receive counts: a short one means no backlog for deletes to yield to.
        assert!(!in_flight.backlog_taken());
        in_flight.received(3);
        assert!(in_flight.backlog_taken());
        in_flight.received(SQS_BATCH_LIMIT);
        assert!(!in_flight.backlog_taken());
        in_flight.received(0);
        assert!(in_flight.backlog_taken());
    }
}
