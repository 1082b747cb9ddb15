//! The byte budget: message bodies held anywhere in the pipeline stay under
//! `MAX_INFLIGHT_BYTES`. A poller reserves room for a receive batch before it asks SQS,
//! keeps what the bodies it got need, and gives the rest back; each body's share is
//! returned when its message leaves the pipeline (deleted, or left for redelivery).
//!
//! A receive briefly holds each body twice (the HTTP response, then the parsed message),
//! so a reservation is twice ten bodies of the largest size seen lately. It starts small, so
//! a stream of small messages never waits on it, and follows the bodies up (at once) and
//! down (slowly): measured with 1 MiB bodies, the receive buffers were most of the memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Largest SQS message body (1 MiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Room one receive of 10 messages can need: each body twice.
pub const MAX_BATCH_BYTES: usize = 2 * crate::sqs::SQS_BATCH_LIMIT * MAX_BODY_BYTES;
/// The body size a reservation assumes before any large body was seen.
const SMALL_BODY_BYTES: usize = 64 << 10;

/// mimalloc's `purge_delay` option (the same index in its v2 and v3 headers; the crate names
/// only the older options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Once a body larger than [`SMALL_BODY_BYTES`] arrives, freed memory goes back to the OS at
/// once instead of after mimalloc's default delay: with 1 MiB bodies the delay kept ~60 MiB of
/// freed receive buffers resident (peak RSS 170 MiB against 112 MiB, BENCHMARKS.md). Small
/// bodies keep the delay: returning every page at once cost ~18 µs of CPU per message.
fn return_freed_memory_at_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: sets one integer option; mimalloc reads its options atomically.
    ONCE.call_once(|| unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) });
}

/// The shared budget.
#[derive(Debug, Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    capacity: usize,
    /// The largest body seen lately, in bytes.
    recent_body: Arc<AtomicUsize>,
    /// What processed messages hold beyond their shares ([`Budget::refit`]).
    debt: Arc<Debt>,
}

/// Bytes held beyond the budget: no receive starts until they are given back.
#[derive(Debug, Default)]
struct Debt {
    bytes: Mutex<usize>,
    paid: Notify,
}

/// A share's part of the [`Debt`], given back when the share is dropped.
#[derive(Debug)]
struct Owed {
    debt: Arc<Debt>,
    bytes: usize,
}

impl Drop for Owed {
    fn drop(&mut self) {
        let mut bytes = self.debt.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *bytes = bytes.saturating_sub(self.bytes);
        if *bytes == 0 {
            self.debt.paid.notify_waiters();
        }
    }
}

/// Bytes of the budget held by one message (or, before a receive, by a reservation).
#[derive(Debug)]
pub struct Share(OwnedSemaphorePermit, Option<Owed>);

impl Share {
    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        self.0.num_permits()
    }
}

impl Budget {
    /// A budget of `capacity` bytes (at least one batch; config enforces it).
    pub fn new(capacity: usize) -> Budget {
        let capacity = capacity.clamp(MAX_BATCH_BYTES, Semaphore::MAX_PERMITS);
        Budget {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
            debt: Arc::default(),
            recent_body: Arc::new(AtomicUsize::new(SMALL_BODY_BYTES)),
        }
    }

    /// Waits until a batch of bodies of the recent size fits in the budget, and reserves it.
    pub async fn reserve_batch(&self) -> Share {
        self.debt_paid().await;
        let body = self.recent_body.load(Ordering::Relaxed);
        self.acquire(2 * crate::sqs::SQS_BATCH_LIMIT * body).await
    }

    /// Waits for `bytes` (at most the whole budget).
    async fn acquire(&self, bytes: usize) -> Share {
        let bytes = bytes.min(self.capacity) as u32;
        let permit =
            self.semaphore.clone().acquire_many_owned(bytes).await.expect("the budget's semaphore is never closed");
        Share(permit, None)
    }

    /// Splits a reservation into one share per body; returns the unused rest to the budget.
    /// Bodies larger than the reservation (after a jump in body size) need more: taken at once
    /// if free; otherwise the reservation is given back and the whole batch waited for, because
    /// pollers that each held a reservation while waiting for more could together hold the
    /// budget and wait forever. While it waits, its bodies (at most ten) are not counted.
    pub async fn shares_for(&self, reservation: Share, sizes: Vec<usize>) -> Vec<Share> {
        let largest = sizes.iter().copied().max().unwrap_or(0);
        if largest > SMALL_BODY_BYTES {
            return_freed_memory_at_once();
        }
        let _ = self.recent_body.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |recent| {
            Some(largest.max(recent - recent / 8).clamp(SMALL_BODY_BYTES, MAX_BODY_BYTES))
        });
        let total: usize = sizes.iter().sum();
        let batch = self.grow(reservation, total).await;
        Budget::split(batch, &sizes)
    }

    /// Makes the shares of processed messages hold what each has become (`needs`, one per share:
    /// a quarantine copy and a sealed original where the body was); room no longer needed goes
    /// back. It never waits (a stage waiting here would hold up what follows it, which holds the
    /// budget it waits for): room that is not free at once becomes a debt the first share carries
    /// until it is dropped, and no receive starts while any debt is outstanding, so what is held
    /// beyond the budget is at most what the batches in flight made of their bodies.
    pub fn refit(&self, shares: Vec<Share>, needs: &[usize]) -> Vec<Share> {
        let mut shares = shares.into_iter();
        let Some(mut batch) = shares.next() else { return Vec::new() };
        for share in shares {
            batch.0.merge(share.0);
        }
        let (total, held) = (needs.iter().sum::<usize>(), batch.0.num_permits());
        let mut owed = None;
        if total > held {
            match self.semaphore.clone().try_acquire_many_owned((total - held).min(self.capacity) as u32) {
                Ok(more) => batch.0.merge(more),
                Err(_) => {
                    let bytes = total - held;
                    *self.debt.bytes.lock().unwrap_or_else(|e| e.into_inner()) += bytes;
                    owed = Some(Owed { debt: self.debt.clone(), bytes });
                }
            }
        }
        let mut shares = Budget::split(batch, needs);
        if let Some(first) = shares.first_mut() {
            first.1 = owed;
        }
        shares
    }

    /// Resolves once no processed message holds more than its share.
    async fn debt_paid(&self) {
        loop {
            let paid = self.debt.paid.notified();
            tokio::pin!(paid);
            paid.as_mut().enable();
            if *self.debt.bytes.lock().unwrap_or_else(|e| e.into_inner()) == 0 {
                return;
            }
            paid.await;
        }
    }

    /// `batch` grown to `total` bytes: at once if the room is free; otherwise everything is
    /// given back and the whole waited for, because holders that each kept their part while
    /// waiting for more could together hold the budget and wait forever. While it waits, what
    /// it holds (at most ten messages) is not counted.
    async fn grow(&self, mut batch: Share, total: usize) -> Share {
        let held = batch.0.num_permits();
        if total > held {
            match self.semaphore.clone().try_acquire_many_owned((total - held).min(self.capacity) as u32) {
                Ok(more) => batch.0.merge(more),
                Err(_) => {
                    drop(batch);
                    batch = self.acquire(total).await;
                }
            }
        }
        batch
    }

    /// One share per size out of `batch`; what is left goes back to the budget.
    fn split(mut batch: Share, sizes: &[usize]) -> Vec<Share> {
        sizes
            .iter()
            .map(|&size| {
                // Less only when the batch is larger than the whole budget (an emulator's bodies).
                let size = size.min(batch.0.num_permits());
                Share(batch.0.split(size).expect("no more than the permits held"), None)
            })
            .collect()
    }

    /// Bytes currently free.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// The budget's size in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_shrink_to_the_bodies_and_shares_come_back() {
        let budget = Budget::new(2 * MAX_BATCH_BYTES);
        let reservation = budget.reserve_batch().await;
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES - 20 * SMALL_BODY_BYTES);
        let shares = budget.shares_for(reservation, vec![100, 200]).await;
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES - 300);
        drop(shares);
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES);
    }

    #[tokio::test]
    async fn processed_messages_hold_what_they_became() {
        let budget = Budget::new(2 * MAX_BATCH_BYTES);
        let shares = budget.shares_for(budget.reserve_batch().await, vec![1_000, 2_000, 3_000]).await;
        // A body that swelled into a 64 KiB copy, one kept as it was, one that shrank.
        let refitted = budget.refit(shares, &[65_536, 2_000, 10]);
        assert_eq!(refitted.iter().map(Share::bytes).collect::<Vec<_>>(), [65_536, 2_000, 10]);
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES - 67_546);
        drop(refitted);
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES);
        // No room at once: the shares stay, the rest is a debt, and no receive starts until it is given back.
        let hog = budget.acquire(budget.capacity() - 100).await;
        let shares = budget
            .shares_for(Share(budget.semaphore.clone().acquire_many_owned(50).await.unwrap(), None), vec![50])
            .await;
        let refitted = budget.refit(shares, &[1_000]);
        assert_eq!(refitted[0].bytes(), 50, "what it had, without waiting");
        drop(hog);
        let receive = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve_batch().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!receive.is_finished(), "no receive while the debt is outstanding");
        drop(refitted);
        tokio::time::timeout(std::time::Duration::from_secs(1), receive).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn reservations_follow_the_body_size_up_at_once_and_down_slowly() {
        let budget = Budget::new(4 * MAX_BATCH_BYTES);
        drop(budget.shares_for(budget.reserve_batch().await, vec![MAX_BODY_BYTES]).await);
        let reservation = budget.reserve_batch().await;
        assert_eq!(budget.available(), 3 * MAX_BATCH_BYTES, "a full batch of the largest body");
        drop(budget.shares_for(reservation, vec![10]).await);
        let reservation = budget.reserve_batch().await;
        assert_eq!(budget.capacity() - budget.available(), 20 * (MAX_BODY_BYTES - MAX_BODY_BYTES / 8));
        drop(reservation);
    }

    #[tokio::test]
    async fn bodies_past_the_reservation_take_free_room_and_stay_counted() {
        let budget = Budget::new(4 * MAX_BATCH_BYTES);
        let reservation = budget.reserve_batch().await;
        let receive = budget.shares_for(reservation, vec![MAX_BODY_BYTES; 10]);
        let shares = tokio::time::timeout(std::time::Duration::from_millis(50), receive).await.expect("room is free");
        assert_eq!(budget.available(), budget.capacity() - 10 * MAX_BODY_BYTES);
        drop(shares);
        assert_eq!(budget.available(), budget.capacity());
    }

    #[tokio::test]
    async fn pollers_whose_bodies_outgrow_their_reservations_do_not_wait_on_each_other_forever() {
        // Four reservations of ~7.5 MiB (bodies of 384 KiB lately) hold 30 of 32 MiB; then every
        // receive brings ten 1 MiB bodies. Each holding its reservation while it waited for
        // 2.5 MiB more, none could ever go on.
        let budget = Budget::new(32 << 20);
        drop(budget.shares_for(budget.reserve_batch().await, vec![384 << 10]).await);
        let mut reservations = Vec::new();
        for _ in 0..4 {
            reservations.push(budget.reserve_batch().await);
        }
        let mut receives = tokio::task::JoinSet::new();
        for reservation in reservations {
            let budget = budget.clone();
            receives.spawn(async move { budget.shares_for(reservation, vec![MAX_BODY_BYTES; 10]).await });
        }
        let wait = std::time::Duration::from_millis(200);
        let mut stored = Vec::new();
        for _ in 0..3 {
            let shares = tokio::time::timeout(wait, receives.join_next()).await.expect("three batches fit");
            stored.push(shares.unwrap().unwrap());
        }
        assert!(tokio::time::timeout(wait, receives.join_next()).await.is_err(), "the fourth waits for room");
        drop(stored.pop());
        let last = tokio::time::timeout(wait, receives.join_next()).await.expect("room made, it goes on");
        let last = last.unwrap().unwrap();
        assert_eq!(last.len(), 10);
        drop(stored);
        assert_eq!(budget.available(), budget.capacity() - 10 * MAX_BODY_BYTES, "the last batch's shares held");
        drop(last);
        assert_eq!(budget.available(), budget.capacity());
    }

    #[tokio::test]
    async fn a_spent_budget_makes_the_next_reservation_wait() {
        let budget = Budget::new(MAX_BATCH_BYTES);
        let held = budget.shares_for(budget.reserve_batch().await, vec![MAX_BODY_BYTES]).await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), budget.reserve_batch()).await;
        assert!(waiting.is_err(), "a full batch does not fit while a body is held");
        drop(held);
        let reserved = tokio::time::timeout(std::time::Duration::from_millis(50), budget.reserve_batch()).await;
        assert!(reserved.is_ok());
    }
}
