//! Sink stage: windows of items ([`crate::windows`]) written one transaction each, up to
//! `SINK_CONNECTIONS` at once, retried while the database cannot take them; what each window
//! became (stored, unstorable, or abandoned at shutdown) goes on to the acknowledgement stage.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{errors, Committed, ErrorClass, Held, Part, Sink, SinkError};
use crate::decode::Reason;
use crate::dedup::Fingerprint;
use crate::mask::Item;
use crate::metrics;
use crate::records::{MaskedLogin, QuarantineRecord, Record};
use crate::retry::Retry;
use crate::source::{Ack, Share};
use crate::summary::Stats;

/// Failed attempts at a window's write after which, if the database takes writes meanwhile, the
/// window is written one record per transaction to find the records that cannot be stored.
const WINDOW_ATTEMPTS: u32 = 8;
/// How long the database has to show it takes writes ([`Sink::takes_writes`]).
const WRITE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest record-by-record pass; the records left then wait with the rest of their window.
const RECORD_PASS_DEADLINE: Duration = Duration::from_secs(60);
/// Written windows waiting for the acknowledgement stage (then the sink waits).
const WRITTEN_WINDOWS: usize = 8;

/// How windows are cut (`BATCH_MAX_ROWS`, `BATCH_MAX_WAIT_MS`) and written (`SINK_CONNECTIONS`).
#[derive(Debug, Clone, Copy)]
pub struct WindowSettings {
    pub max_rows: usize,
    pub max_wait: Duration,
    pub connections: usize,
}

/// A stored message: deleted, then remembered as committed by the dedup cache.
#[derive(Debug)]
pub struct Stored {
    pub ack: Ack,
    /// `None` for a cache duplicate (already remembered).
    pub fingerprint: Option<Fingerprint>,
    /// When its row (or quarantine record) committed.
    pub committed_at: tokio::time::Instant,
}

/// What became of one window.
#[derive(Debug)]
pub enum Written {
    /// Committed: `stored` are to be deleted; `unstorable`, records not even the quarantine could
    /// store, to be released undeleted for the queue's redrive policy.
    Committed { stored: Vec<Stored>, unstorable: Vec<Ack> },
    /// Shutdown's grace period ended before it committed (rolled back): left for redelivery.
    Abandoned(Vec<Ack>),
}

/// What the sink stage writes with.
pub struct Writer {
    pub sink: Sink,
    pub stats: Arc<Stats>,
    pub max_backoff: Duration,
    /// Cancelled when shutdown's grace period is over: writes in progress are cancelled
    /// (rolled back), retries stop, and what is left is abandoned for redelivery.
    pub abort: CancellationToken,
}

/// The sink stage: windows of `masked` written as they come; returns the future that does the
/// writing (it ends once `masked` ends and every write has finished) and the stream of what each
/// window became. The next window is written while the previous one's deletes run.
pub fn write(
    masked: impl Stream<Item = Item>,
    writer: Arc<Writer>,
    settings: WindowSettings,
) -> (impl Future<Output = ()>, impl Stream<Item = Written>) {
    let (to_acks, written) = mpsc::channel::<Written>(WRITTEN_WINDOWS);
    let writes = crate::windows::write_in_windows(
        masked,
        settings.max_rows,
        settings.max_wait,
        settings.connections,
        move |items, connection| {
            let writer = writer.clone();
            let to_acks = to_acks.clone();
            async move { writer.flush(items, connection, &to_acks).await }
        },
    );
    (writes, ReceiverStream::new(written))
}

/// A window split by destination.
#[derive(Default)]
struct Window {
    acks: Vec<Ack>,
    logins: Vec<MaskedLogin>,
    quarantine: Vec<QuarantineRecord>,
    /// Per ack, its fingerprint to remember once deleted (`None` for a cache duplicate: already known).
    fingerprints: Vec<Option<Fingerprint>>,
    /// The bodies' shares of the byte budget, returned when the window is done.
    _shares: Vec<Share>,
}

impl Window {
    fn split(items: Vec<Item>) -> Window {
        let mut window = Window { acks: Vec::with_capacity(items.len()), ..Window::default() };
        for item in items {
            window.acks.push(item.ack);
            window._shares.extend(item.share);
            let fingerprint = match item.record {
                Record::Login(login) => {
                    window.logins.push(login);
                    Some(item.fingerprint)
                }
                Record::Quarantine(record) => {
                    window.quarantine.push(record);
                    Some(item.fingerprint)
                }
                Record::Duplicate => None,
            };
            window.fingerprints.push(fingerprint);
        }
        window
    }
}

/// How a record-by-record pass ended.
enum PassEnd {
    /// Every record was stored or found unstorable.
    Done,
    /// Shutdown's grace period is over.
    Cancelled,
    /// The database stopped taking writes: the rest waits for it.
    Held,
    /// The pass ran for [`RECORD_PASS_DEADLINE`]: the rest is tried whole once, then the pass goes on.
    OutOfTime,
}

impl Writer {
    /// Writes one window (retrying while the database is unavailable, until it commits or
    /// shutdown gives up) and hands what became of it to the acknowledgement stage.
    ///
    /// `connection` is the window's sink slot, given back once the window is handed over.
    async fn flush(&self, items: Vec<Item>, connection: OwnedSemaphorePermit, to_acks: &mpsc::Sender<Written>) {
        let started = Instant::now();
        let window = Window::split(items);
        // The channel closes only after every flush has ended, so the sends cannot fail.
        let Some(written) = self.write_with_retry(&window).await else {
            drop(connection);
            let _ = to_acks.send(Written::Abandoned(window.acks)).await;
            return;
        };
        self.record_commit(&window, &written, started);

        let committed_at = tokio::time::Instant::now();
        let unstorable_ids: HashSet<&str> = written.unstorable.iter().map(String::as_str).collect();
        let mut stored = Vec::with_capacity(window.acks.len());
        let mut unstorable = Vec::new();
        for (ack, fingerprint) in window.acks.into_iter().zip(window.fingerprints) {
            if unstorable_ids.contains(ack.message_id.as_str()) {
                unstorable.push(ack);
            } else {
                stored.push(Stored { ack, fingerprint, committed_at });
            }
        }
        let _ = to_acks.send(Written::Committed { stored, unstorable }).await;
        drop(connection);
    }

    /// Metrics and counters of a committed window.
    fn record_commit(&self, window: &Window, committed: &Committed, started: Instant) {
        let now = Utc::now();
        metrics::histogram!(metrics::BATCH_SIZE).record(window.acks.len() as f64);
        metrics::histogram!(metrics::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
        let latency = metrics::histogram!(metrics::END_TO_END_LATENCY);
        for login in &window.logins {
            latency.record((now - login.sent_at).as_seconds_f64().max(0.0));
        }
        metrics::counter!(metrics::RECORDS_WRITTEN).increment(committed.written);
        metrics::counter!(metrics::DUPLICATES_DROPPED, "stage" => "database").increment(committed.already_stored);
        let unstorable: HashSet<&str> = committed.unstorable.iter().map(String::as_str).collect();
        let mut by_reason: HashMap<Reason, u64> = HashMap::new();
        let quarantined = window.quarantine.iter().filter(|r| !unstorable.contains(r.message_id.as_str()));
        for record in quarantined.chain(&committed.rejected) {
            *by_reason.entry(record.reason).or_default() += 1;
        }
        for (reason, n) in &by_reason {
            metrics::counter!(metrics::QUARANTINED, "reason" => reason.as_str()).increment(*n);
        }
        if !committed.rejected.is_empty() {
            metrics::counter!(metrics::ERRORS, "stage" => "sink", "kind" => "rejected_record")
                .increment(committed.rejected.len() as u64);
        }
        Stats::add(&self.stats.written, committed.written);
        Stats::add(&self.stats.duplicates, committed.already_stored);
        Stats::add(&self.stats.quarantined, by_reason.values().sum());
        self.stats.add_reasons(by_reason);
    }

    /// The window's write, retried with backoff while the database is unavailable or busy;
    /// `None` once shutdown's grace period is over (the write in progress is rolled back).
    ///
    /// While the window is retried it is held ([`Sink::hold`]): `loginflow_database_writable` is 0
    /// and `/readyz` says not ready; each failure is logged with its SQLSTATE. While the database
    /// cannot take writes (down, read-only, a privilege or table gone: the write probe fails) the
    /// window waits, however long; nothing is released. A window that keeps failing while the
    /// probe passes holds something the database will not take (a record whose trigger outlasts
    /// the statement timeout, or raises a "busy" SQLSTATE every time): after [`WINDOW_ATTEMPTS`]
    /// (and, for a refusal a trigger can raise, such as `42P01`, a second passing probe, so a
    /// window is not split just as an outage ends) it is written one record per transaction, and
    /// the records that still fail are reported unstorable, to be released for the queue's
    /// redrive policy instead of held forever.
    async fn write_with_retry(&self, window: &Window) -> Option<Committed> {
        let mut retry = Retry::new("sink", self.max_backoff);
        // Failures since the last record-by-record pass (the retry counts them all).
        let mut failures = 0;
        // Failures saying "unavailable" after which the probe passed anyway: a record's doing
        // (a trigger raising such a code on some rows) once it happens twice.
        let mut unexplained = 0;
        // The records not yet stored: always a suffix of the window's logins, then of its quarantine records.
        let mut pending = Part { logins: &window.logins, quarantine: &window.quarantine };
        let mut committed = Committed::default();
        let mut held: Option<Held> = None;
        loop {
            match self.sink.write(pending.logins, pending.quarantine, &self.abort).await {
                Ok(done) => {
                    committed.add(done);
                    return Some(committed);
                }
                Err(SinkError::Cancelled) => return None,
                Err(err) => {
                    let class = err.class();
                    held.get_or_insert_with(|| self.sink.hold());
                    failures += 1;
                    tracing::warn!(error = %crate::errors::error_chain(&err), sqlstate = err.sqlstate(), ?class, failures,
                                   messages = pending.len(), "batch not committed; the database cannot take it now, retrying");
                    if failures >= WINDOW_ATTEMPTS {
                        let takes_writes = tokio::select! {
                            takes_writes = self.sink.takes_writes(WRITE_PROBE_TIMEOUT) => takes_writes,
                            _ = self.abort.cancelled() => return None,
                        };
                        if takes_writes && class != ErrorClass::Busy && errors::may_be_a_records(err.sqlstate()) {
                            unexplained += 1;
                        }
                        if !takes_writes {
                            unexplained = 0;
                            tracing::warn!(
                                failures,
                                sqlstate = err.sqlstate(),
                                "the database takes no writes now; the batch waits for it"
                            );
                        } else if class == ErrorClass::Busy || unexplained >= 2 {
                            match self.write_record_by_record(&mut pending, &mut committed).await {
                                PassEnd::Done => return Some(committed),
                                PassEnd::Cancelled => return None,
                                // Out of time: one whole-window attempt, then the pass goes on.
                                PassEnd::OutOfTime => failures = WINDOW_ATTEMPTS - 1,
                                // The database stopped taking writes: the rest waits, with fresh attempts.
                                PassEnd::Held => (failures, unexplained) = (0, 0),
                            }
                        }
                    }
                    if retry.pause(Some(&self.abort)).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Writes each pending record in its own transaction, once, advancing `pending` past it; a
    /// record whose write fails while the write probe passes is reported unstorable. Stops when
    /// the database stops taking writes, or no connection is to be had ([`PassEnd::Held`]), or
    /// after [`RECORD_PASS_DEADLINE`] ([`PassEnd::OutOfTime`]).
    async fn write_record_by_record(&self, pending: &mut Part<'_>, committed: &mut Committed) -> PassEnd {
        tracing::warn!(
            messages = pending.len(),
            attempts = WINDOW_ATTEMPTS,
            "the database takes writes but this batch keeps failing; writing its records one by one"
        );
        let deadline = tokio::time::Instant::now() + RECORD_PASS_DEADLINE;
        while let Some((record, message_id, rest)) = pending.split_first() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    left = pending.len(),
                    "record-by-record pass out of time; it goes on after one more try of the rest"
                );
                return PassEnd::OutOfTime;
            }
            match self.sink.write(record.logins, record.quarantine, &self.abort).await {
                Ok(done) => committed.add(done),
                Err(SinkError::Cancelled) => return PassEnd::Cancelled,
                Err(err) => {
                    // A record's failure is the record's only while the database takes writes; no
                    // connection from the pool says nothing of the record.
                    let takes_writes = !matches!(err, SinkError::Pool(_))
                        && tokio::select! {
                            takes_writes = self.sink.takes_writes(WRITE_PROBE_TIMEOUT) => takes_writes,
                            _ = self.abort.cancelled() => return PassEnd::Cancelled,
                        };
                    if !takes_writes {
                        tracing::warn!(
                            sqlstate = err.sqlstate(),
                            left = pending.len(),
                            "the database stopped taking writes; the rest of the batch waits for it"
                        );
                        return PassEnd::Held;
                    }
                    tracing::warn!(error = %crate::errors::error_chain(&err), sqlstate = err.sqlstate(), %message_id,
                                   "record not stored after every attempt");
                    committed.unstorable.push(message_id.to_owned());
                }
            }
            *pending = rest;
        }
        PassEnd::Done
    }
}
