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
/// timers, no eviction policy and no background upkeep (it replaced moka, whose lookup and
/// insert cost ~1.9 µs per message against ~0.12 µs: BENCHMARKS.md). When full, the oldest go
/// first. Expired ids are forgotten at the next commit marked (each delete batch), so a lookup
/// only reads.
#[derive(Clone)]
pub struct Dedup {
    remembered: Arc<Mutex<Remembered>>,
    capacity: usize,
    ttl: Duration,
}

/// Most expired ids forgotten per commit: after an idle spell longer than the TTL, a full cache
/// empties over a few commits instead of stalling one (the capacity bounds it meanwhile).
const EXPIRED_PER_COMMIT: usize = 4096;

#[derive(Default)]
struct Remembered {
    // foldhash, not SipHash: the keys are SHA-256 digests, which no sender can aim at a bucket.
    fingerprints: HashSet<Fingerprint, foldhash::fast::RandomState>,
    by_age: VecDeque<(Fingerprint, Instant)>,
}

impl Remembered {
    fn forget_oldest(&mut self) {
        if let Some((fingerprint, _)) = self.by_age.pop_front() {
            self.fingerprints.remove(&fingerprint);
        }
    }

    fn forget_expired(&mut self, now: Instant, ttl: Duration, at_most: usize) {
        for _ in 0..at_most {
            match self.by_age.front() {
                Some((_, at)) if now.duration_since(*at) >= ttl => self.forget_oldest(),
                _ => break,
            }
        }
    }
}

impl Dedup {
    /// A cache of at most `capacity` message ids (at least 1), each remembered for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Dedup {
        Dedup { remembered: Arc::default(), capacity: capacity.max(1), ttl }
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

    /// Whether a message with this fingerprint committed and is still remembered (an id past
    /// its TTL still counts until the next commit forgets it: it did commit, so that is safe).
    pub fn is_committed(&self, fingerprint: Fingerprint) -> bool {
        self.lock().fingerprints.contains(&fingerprint)
    }

    /// Remembers fingerprints whose messages just committed (one already remembered keeps its age).
    pub fn mark_committed(&self, fingerprints: impl IntoIterator<Item = Fingerprint>) {
        let entries = self.mark_committed_at(fingerprints, None);
        metrics::gauge!(metrics::DEDUP_CACHE_ENTRIES).set(entries as f64);
    }

    /// [`Dedup::mark_committed`] at a given time (tests), or now; returns the entries held.
    fn mark_committed_at(&self, fingerprints: impl IntoIterator<Item = Fingerprint>, at: Option<Instant>) -> usize {
        let mut remembered = self.lock();
        let now = at.unwrap_or_else(Instant::now);
        remembered.forget_expired(now, self.ttl, EXPIRED_PER_COMMIT);
        for fingerprint in fingerprints {
            if !remembered.fingerprints.contains(&fingerprint) {
                if remembered.by_age.len() >= self.capacity {
                    remembered.forget_oldest();
                }
                remembered.fingerprints.insert(fingerprint);
                remembered.by_age.push_back((fingerprint, now));
            }
        }
        remembered.by_age.len()
    }

    /// Entries currently held (expired ones included until the next commit).
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
    fn entries_expire_a_ttl_after_their_first_commit() {
        let dedup = Dedup::new(100, Duration::from_secs(10));
        let (a, b, c) = (dedup.fingerprint("m-1"), dedup.fingerprint("m-2"), dedup.fingerprint("m-3"));
        let start = Instant::now();
        dedup.mark_committed_at([a], Some(start));
        dedup.mark_committed_at([b, a], Some(start + Duration::from_secs(6)));
        assert!(dedup.is_committed(a) && dedup.is_committed(b));
        dedup.mark_committed_at([c], Some(start + Duration::from_secs(10)));
        assert!(!dedup.is_committed(a), "a's age counts from its first commit");
        assert!(dedup.is_committed(b) && dedup.is_committed(c));
        assert_eq!(dedup.entries(), 2);
    }

    #[test]
    fn a_commit_after_an_idle_spell_forgets_a_bounded_number_of_expired_ids() {
        let count = 3 * EXPIRED_PER_COMMIT;
        let dedup = Dedup::new(count, Duration::from_secs(1));
        let start = Instant::now();
        dedup.mark_committed_at((0..count as u128).map(|i| i + 1_000_000), Some(start));
        let later = Some(start + Duration::from_secs(60));
        assert_eq!(dedup.mark_committed_at([1], later), count - EXPIRED_PER_COMMIT + 1);
        assert_eq!(dedup.mark_committed_at([2], later), count - 2 * EXPIRED_PER_COMMIT + 2);
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
