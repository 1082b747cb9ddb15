//! Capped exponential backoff with jitter, for every retried call.

use std::time::Duration;

use rand::Rng;

/// Delays of about 100 ms, 200 ms, 400 ms ... up to `max`, each shortened by up to 25 % at
/// random (at the cap too), so that replicas retrying a long outage do not fall into lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// First delay of a fresh backoff.
    pub const INITIAL: Duration = Duration::from_millis(100);

    pub fn new(max: Duration) -> Backoff {
        Backoff { next: Backoff::INITIAL.min(max), max }
    }

    /// The delay to sleep before the next attempt; doubles each call up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.75..=1.0))
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = Backoff::INITIAL.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(75) && delays[0] <= Duration::from_millis(100));
        assert!(delays[1] >= Duration::from_millis(150));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(750));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn delays_at_the_cap_still_differ() {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let at_cap: std::collections::HashSet<Duration> = (0..40).map(|_| backoff.next_delay()).skip(10).collect();
        assert!(at_cap.len() > 20, "capped delays are jittered: {at_cap:?}");
    }
}
