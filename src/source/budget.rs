//! The byte budget: message bodies held anywhere in the pipeline stay under
//! `MAX_INFLIGHT_BYTES`. A poller reserves room for a full receive batch before it asks
//! SQS, keeps what the bodies it got need, and gives the rest back; each body's share is
//! returned when its message leaves the pipeline (deleted, or left for redelivery).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest SQS message body (1 MiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Room one receive of 10 messages can need.
pub const MAX_BATCH_BYTES: usize = crate::source::SQS_BATCH_LIMIT * MAX_BODY_BYTES;

/// The shared budget.
#[derive(Debug, Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    capacity: usize,
}

/// Bytes of the budget held by one message (or, before a receive, by a reservation).
#[derive(Debug)]
pub struct Share(OwnedSemaphorePermit);

impl Budget {
    /// A budget of `capacity` bytes (at least one batch; config enforces it).
    pub fn new(capacity: usize) -> Budget {
        let capacity = capacity.clamp(MAX_BATCH_BYTES, Semaphore::MAX_PERMITS);
        Budget { semaphore: Arc::new(Semaphore::new(capacity)), capacity }
    }

    /// Waits until a full batch fits in the budget, and reserves it.
    pub async fn reserve_batch(&self) -> Share {
        self.acquire(MAX_BATCH_BYTES).await
    }

    /// Waits for `bytes` (at most the whole budget).
    async fn acquire(&self, bytes: usize) -> Share {
        let bytes = bytes.min(self.capacity) as u32;
        let permit =
            self.semaphore.clone().acquire_many_owned(bytes).await.expect("the budget's semaphore is never closed");
        Share(permit)
    }

    /// Splits a reservation into one share per body; returns the unused rest to the budget.
    /// Bodies larger than the reservation (only an emulator sends them) wait for the difference.
    pub async fn shares_for(&self, mut reservation: Share, sizes: impl IntoIterator<Item = usize>) -> Vec<Share> {
        let mut shares = Vec::new();
        for size in sizes {
            let share = match reservation.0.split(size) {
                Some(permit) => Share(permit),
                None => self.acquire(size).await,
            };
            shares.push(share);
        }
        shares
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
        assert_eq!(budget.available(), MAX_BATCH_BYTES);
        let shares = budget.shares_for(reservation, [100, 200]).await;
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES - 300);
        drop(shares);
        assert_eq!(budget.available(), 2 * MAX_BATCH_BYTES);
    }

    #[tokio::test]
    async fn a_spent_budget_makes_the_next_reservation_wait() {
        let budget = Budget::new(MAX_BATCH_BYTES);
        let held = budget.shares_for(budget.reserve_batch().await, [MAX_BODY_BYTES]).await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), budget.reserve_batch()).await;
        assert!(waiting.is_err(), "a full batch does not fit while a body is held");
        drop(held);
        let reserved = tokio::time::timeout(std::time::Duration::from_millis(50), budget.reserve_batch()).await;
        assert!(reserved.is_ok());
    }
}
