//! Dedup: an in-memory TTL cache of messages already committed.
//!
//! A key enters the cache only after its row (or quarantine record) commits, so
//! a cache hit is always safe to delete from the queue without writing. Copies
//! that arrive while the first is still in flight are caught by the database's
//! unique `message_id` instead; that guarantee also holds across restarts and replicas.

use std::time::Duration;

use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::metrics;

/// A 128-bit digest of the dedup key: small in memory, collisions out of reach.
pub type Fingerprint = u128;

/// The cache of committed fingerprints.
#[derive(Clone)]
pub struct Dedup {
    cache: Cache<Fingerprint, ()>,
}

impl Dedup {
    /// A cache of at most `capacity` message ids, each remembered for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Dedup {
        Dedup { cache: Cache::builder().max_capacity(capacity as u64).time_to_live(ttl).build() }
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
        self.cache.contains_key(&fingerprint)
    }

    /// Remembers fingerprints whose messages just committed.
    pub async fn mark_committed(&self, fingerprints: impl IntoIterator<Item = Fingerprint>) {
        for fingerprint in fingerprints {
            self.cache.insert(fingerprint, ()).await;
        }
        metrics::gauge!(metrics::DEDUP_CACHE_ENTRIES).set(self.cache.entry_count() as f64);
    }

    /// Entries currently held (approximate until pending maintenance runs).
    pub async fn entries(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_only_what_committed() {
        let dedup = Dedup::new(100, Duration::from_secs(60));
        let a = dedup.fingerprint("m-1");
        assert!(!dedup.is_committed(a));
        dedup.mark_committed([a]).await;
        assert!(dedup.is_committed(a));
        assert!(!dedup.is_committed(dedup.fingerprint("m-2")));
        assert_eq!(dedup.entries().await, 1);
    }

    #[test]
    fn only_the_message_id_makes_a_duplicate() {
        let dedup = Dedup::new(100, Duration::from_secs(60));
        assert_ne!(dedup.fingerprint("m-1"), dedup.fingerprint("m-2"));
        assert_eq!(dedup.fingerprint("m-1"), dedup.fingerprint("m-1"));
    }

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let dedup = Dedup::new(100, Duration::from_millis(50));
        let a = dedup.fingerprint("m-1");
        dedup.mark_committed([a]).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!dedup.is_committed(a));
    }

    #[tokio::test]
    async fn capacity_bounds_the_cache() {
        let dedup = Dedup::new(50, Duration::from_secs(60));
        dedup.mark_committed((0..1000).map(|i| dedup.fingerprint(&i.to_string()))).await;
        let len = dedup.entries().await;
        assert!(len <= 50, "{len}");
    }
}
