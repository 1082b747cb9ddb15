//! Dedup stage: drops messages already committed, by a moka TTL cache of their keys.
//!
//! A key enters the cache only after its row (or quarantine record) commits, once its delete call
//! has ended (deleted, given up, or cut short at shutdown), so a cache hit is always safe to delete
//! from the queue without writing. Copies that
//! arrive while the first is still in flight, or after the cache forgot it, are caught by the
//! database's unique `message_id` instead; that guarantee also holds across restarts and replicas.
//! The cache only spares those copies a database round trip.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use sha2::{Digest, Sha256};

use crate::metrics;
use crate::source::envelope::InputFormat;
use crate::source::{Envelope, InFlight};
use crate::summary::Stats;
use crate::transform::{self, Opened};

/// A 128-bit digest of the dedup key: 16 bytes in the cache whatever the id's length, and
/// collisions out of reach (2^64 keys before one is likely).
pub type Fingerprint = u128;

/// Default of `DEDUP_CAPACITY`. Each entry costs ~225–300 bytes in moka (`examples/dedup_memory.rs`,
/// BENCHMARKS.md): 50 000 cover the redelivery window of a committed message whose delete was lost
/// (one visibility timeout, 60 s by default) at ~830 msg/s, in ~14 MiB, within the 64 MiB bar; a copy
/// the cache no longer holds is still dropped by the unique index, at the cost of a round trip.
pub const DEFAULT_CAPACITY: u64 = 50_000;

/// The cache of committed fingerprints (cheap to clone: one shared cache).
#[derive(Clone)]
pub struct Dedup {
    cache: Cache<Fingerprint, (), foldhash::fast::RandomState>,
}

impl Dedup {
    /// A cache of at most `capacity` message keys, each remembered for `ttl` after its commit.
    /// When full the least recently committed go first (LRU: a new commit is always admitted).
    pub fn new(capacity: u64, ttl: Duration) -> Dedup {
        let cache = Cache::builder()
            .max_capacity(capacity)
            // Sized once: growing the table as it fills cost ~0.3 % of the CPU (perf).
            .initial_capacity(capacity.min(1 << 20) as usize)
            .time_to_live(ttl)
            .eviction_policy(EvictionPolicy::lru())
            // foldhash, not SipHash: the keys are SHA-256 digests, which no sender can aim at a bucket.
            .build_with_hasher(foldhash::fast::RandomState::default());
        Dedup { cache }
    }

    /// The fingerprint of a message key. Messages are keyed by id only: bodies carry no
    /// timestamp, so two real logins can be byte-identical and must both become rows.
    pub fn fingerprint(message_key: &str) -> Fingerprint {
        let digest = Sha256::digest(message_key.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        u128::from_le_bytes(first)
    }

    /// Whether a message with this fingerprint committed within the TTL (a lookup only: it
    /// neither renews the entry nor counts as a use).
    pub fn is_committed(&self, fingerprint: Fingerprint) -> bool {
        self.cache.contains_key(&fingerprint)
    }

    /// Remembers the fingerprints of one delete batch, whose messages committed.
    pub fn mark_committed(&self, fingerprints: impl IntoIterator<Item = Fingerprint>) {
        for fingerprint in fingerprints {
            self.cache.insert(fingerprint, ());
        }
        metrics::gauge!(metrics::DEDUP_CACHE_ENTRIES).set(self.cache.entry_count() as f64);
    }

    /// Keys each message of a receive batch ([`transform::open`]) and looks it up: the stage's
    /// work on one batch, without its counting.
    pub fn key_batch(&self, batch: Vec<Envelope>, input_format: InputFormat) -> Vec<Keyed> {
        batch
            .into_iter()
            .map(|envelope| {
                let opened = transform::open(envelope, input_format);
                let fingerprint = Dedup::fingerprint(&opened.envelope.ack.message_id);
                Keyed { duplicate: self.is_committed(fingerprint), opened, fingerprint }
            })
            .collect()
    }

    /// Entries held, after the cache's pending upkeep (evictions, expiries) has run.
    pub fn entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

/// A message with its key settled ([`transform::open`]) and looked up in the cache.
pub struct Keyed {
    pub opened: Opened,
    pub fingerprint: Fingerprint,
    /// Committed before (a cache hit): deleted without a write.
    pub duplicate: bool,
}

// Written out: the unwrapped event holds raw PII, which no Debug may print.
impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed").field("envelope", &self.opened.envelope).field("duplicate", &self.duplicate).finish()
    }
}

/// The dedup stage: each receive batch, its messages keyed (the SNS key rule) and looked up.
/// Counts what it sees (`loginflow_duplicates_dropped_total{stage="cache"}`).
/// A batch whose keying panicked (a bug, not bad data) is left for redelivery: released from
/// the in-flight registry, so its visibility is no longer extended.
pub fn drop_committed(
    received: impl Stream<Item = Vec<Envelope>>,
    dedup: Dedup,
    input_format: InputFormat,
    in_flight: Arc<InFlight>,
    stats: Arc<Stats>,
) -> impl Stream<Item = Vec<Keyed>> {
    received.map(move |batch| {
        let receipts: Vec<Arc<str>> = batch.iter().map(|e| e.ack.receipt_handle.clone()).collect();
        let keyed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dedup.key_batch(batch, input_format)));
        let Ok(keyed) = keyed else {
            in_flight.give_up_after_panic("keying", &receipts);
            return Vec::new();
        };
        let duplicates = keyed.iter().filter(|k| k.duplicate).count() as u64;
        metrics::counter!(metrics::DUPLICATES_DROPPED, "stage" => "cache").increment(duplicates);
        Stats::add(&stats.duplicates, duplicates);
        Stats::add(&stats.received, keyed.len() as u64);
        keyed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_only_what_committed() {
        let dedup = Dedup::new(100, Duration::from_secs(60));
        let a = Dedup::fingerprint("m-1");
        assert!(!dedup.is_committed(a));
        dedup.mark_committed([a]);
        assert!(dedup.is_committed(a));
        assert!(!dedup.is_committed(Dedup::fingerprint("m-2")));
        dedup.mark_committed([a]);
        assert_eq!(dedup.entries(), 1);
    }

    #[test]
    fn only_the_message_key_makes_a_duplicate() {
        assert_ne!(Dedup::fingerprint("m-1"), Dedup::fingerprint("m-2"));
        assert_eq!(Dedup::fingerprint("m-1"), Dedup::fingerprint("m-1"));
    }

    #[test]
    fn entries_expire_a_ttl_after_their_commit() {
        let dedup = Dedup::new(100, Duration::from_millis(200));
        let a = Dedup::fingerprint("m-1");
        dedup.mark_committed([a]);
        assert!(dedup.is_committed(a));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!dedup.is_committed(a), "forgotten after the TTL");
        assert_eq!(dedup.entries(), 0);
    }

    #[test]
    fn capacity_bounds_the_cache_and_the_latest_commits_stay() {
        let dedup = Dedup::new(50, Duration::from_secs(60));
        let ids: Vec<_> = (0..1000).map(|i| Dedup::fingerprint(&i.to_string())).collect();
        for chunk in ids.chunks(10) {
            dedup.mark_committed(chunk.iter().copied());
            dedup.entries();
        }
        assert!(dedup.entries() <= 50);
        assert!(ids[990..].iter().all(|id| dedup.is_committed(*id)), "the last batch is always admitted");
        assert!(ids[..900].iter().filter(|id| dedup.is_committed(**id)).count() == 0);
    }
}
