//! Dedup: an in-memory TTL cache of messages already committed.
//!
//! A key enters the cache only after its row (or quarantine record) commits, so
//! a cache hit is always safe to delete from the queue without writing. Copies
//! that arrive while the first is still in flight are caught by the database's
//! unique `message_id` instead; that guarantee also holds across restarts and replicas.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::metrics;

/// A 128-bit digest of the dedup key: small in memory, collisions out of reach.
pub type Fingerprint = u128;

/// The cache of committed fingerprints.
///
/// Every entry lives for the same TTL, so the order of insertion is the order of expiry:
/// a set for lookups and a queue in commit order are the whole cache, with no per-entry
/// timers, no eviction policy and no background upkeep (it replaced moka, whose inserts
/// cost more per message than decoding and masking together: BENCHMARKS.md). When full,
/// the oldest go first.
#[derive(Clone)]
pub struct Dedup {
    remembered: Arc<Mutex<Remembered>>,
    capacity: usize,
    ttl: Duration,
}

#[derive(Default)]
struct Remembered {
    // foldhash, not SipHash: fingerprints are already digests, and nobody outside picks them.
    fingerprints: HashSet<Fingerprint, foldhash::fast::RandomState>,
    by_age: VecDeque<(Fingerprint, Instant)>,
}

impl Remembered {
    fn forget_oldest(&mut self) {
        if let Some((fingerprint, _)) = self.by_age.pop_front() {
            self.fingerprints.remove(&fingerprint);
        }
    }

    fn forget_expired(&mut self, now: Instant, ttl: Duration) {
        while self.by_age.front().is_some_and(|(_, at)| now.duration_since(*at) >= ttl) {
            self.forget_oldest();
        }
    }
}

impl Dedup {
    /// A cache of at most `capacity` message ids, each remembered for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Dedup {
        Dedup { remembered: Arc::default(), capacity, ttl }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.remembered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fingerprint of a message id. Messages are keyed by id only: bodies carry no
    /// timestamp, so two real logins can be byte-identical and must both become rows.
    pub fn fingerprint(&self, message_id: &str) -> Fingerprint {
        let digest = Sha256::digest(message_id.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        u128::from_le_bytes(first)
    }

    /// Whether a message with this fingerprint was committed within the TTL.
    pub fn is_committed(&self, fingerprint: Fingerprint) -> bool {
        let mut remembered = self.lock();
        remembered.forget_expired(Instant::now(), self.ttl);
        remembered.fingerprints.contains(&fingerprint)
    }

    /// Remembers fingerprints whose messages just committed (one already remembered keeps its age).
    pub fn mark_committed(&self, fingerprints: impl IntoIterator<Item = Fingerprint>) {
        let now = Instant::now();
        let mut remembered = self.lock();
        remembered.forget_expired(now, self.ttl);
        for fingerprint in fingerprints {
            if remembered.fingerprints.insert(fingerprint) {
                remembered.by_age.push_back((fingerprint, now));
                if remembered.by_age.len() > self.capacity {
                    remembered.forget_oldest();
                }
            }
        }
        metrics::gauge!(metrics::DEDUP_CACHE_ENTRIES).set(remembered.by_age.len() as f64);
    }

    /// Entries currently held (expired ones included until the next lookup or insert).
    pub fn entries(&self) -> usize {
        self.lock().by_age.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_only_what_committed() {
        let dedup = Dedup::new(100, Duration::from_secs(60));
        let a = dedup.fingerprint("m-1");
        assert!(!dedup.is_committed(a));
        dedup.mark_committed([a]);
        assert!(dedup.is_committed(a));
        assert!(!dedup.is_committed(dedup.fingerprint("m-2")));
        dedup.mark_committed([a]);
        assert_eq!(dedup.entries(), 1);
    }

    #[test]
    fn only_the_message_id_makes_a_duplicate() {
        let dedup = Dedup::new(100, Duration::from_secs(60));
        assert_ne!(dedup.fingerprint("m-1"), dedup.fingerprint("m-2"));
        assert_eq!(dedup.fingerprint("m-1"), dedup.fingerprint("m-1"));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let dedup = Dedup::new(100, Duration::from_millis(200));
        let (a, b) = (dedup.fingerprint("m-1"), dedup.fingerprint("m-2"));
        dedup.mark_committed([a]);
        std::thread::sleep(Duration::from_millis(120));
        dedup.mark_committed([b, a]);
        assert!(dedup.is_committed(a) && dedup.is_committed(b));
        std::thread::sleep(Duration::from_millis(120));
        // a's age counts from its first commit; b, committed later, is still remembered.
        assert!(!dedup.is_committed(a));
        assert!(dedup.is_committed(b));
        assert_eq!(dedup.entries(), 1);
    }

    #[test]
    fn capacity_bounds_the_cache_and_the_oldest_go_first() {
        let dedup = Dedup::new(50, Duration::from_secs(60));
        let ids: Vec<_> = (0..1000).map(|i| dedup.fingerprint(&i.to_string())).collect();
        dedup.mark_committed(ids.iter().copied());
        assert_eq!(dedup.entries(), 50);
        assert!(ids[950..].iter().all(|id| dedup.is_committed(*id)));
        assert!(!ids[..950].iter().any(|id| dedup.is_committed(*id)));
    }
}
