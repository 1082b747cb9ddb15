//! What one `run` did: counters shared by the stages, and the summary printed at exit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::decode::Reason;

/// What one `run` did, for the summary printed at exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub received: u64,
    pub written: u64,
    /// Duplicates dropped: cache hits plus redeliveries the unique index caught.
    pub duplicates: u64,
    pub quarantined: u64,
    pub quarantined_by_reason: Vec<(String, u64)>,
    pub deleted: u64,
    /// Deletes that failed for good; those messages come back and are dropped as duplicates.
    pub delete_failures: u64,
    /// Messages not even the quarantine could store, released undeleted so the queue's
    /// redrive policy moves them to the dead-letter queue.
    pub released: u64,
    /// Messages left for redelivery because shutdown's grace period ran out.
    pub abandoned: u64,
    /// SQS requests sent (each attempt), by action: what SQS bills.
    pub sqs_requests: Vec<(&'static str, u64)>,
}

/// The counters behind [`RunSummary`].
#[derive(Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub written: AtomicU64,
    pub duplicates: AtomicU64,
    pub quarantined: AtomicU64,
    pub deleted: AtomicU64,
    pub delete_failures: AtomicU64,
    pub released: AtomicU64,
    pub abandoned: AtomicU64,
    pub by_reason: Mutex<HashMap<Reason, u64>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_reasons(&self, by_reason: HashMap<Reason, u64>) {
        let mut totals = self.by_reason.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, n) in by_reason {
            *totals.entry(reason).or_default() += n;
        }
    }

    pub fn summary(&self) -> RunSummary {
        let mut by_reason: Vec<(String, u64)> = self
            .by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(reason, n)| (reason.as_str().to_owned(), *n))
            .collect();
        by_reason.sort();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RunSummary {
            received: load(&self.received),
            written: load(&self.written),
            duplicates: load(&self.duplicates),
            quarantined: load(&self.quarantined),
            quarantined_by_reason: by_reason,
            deleted: load(&self.deleted),
            delete_failures: load(&self.delete_failures),
            released: load(&self.released),
            abandoned: load(&self.abandoned),
            sqs_requests: Vec::new(),
        }
    }
}
