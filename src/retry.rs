//! The one retry helper of every retried call (window write, migration, receive, delete,
//! seed): attempts, deadline, capped exponential backoff with jitter, and the counting and
//! logging of each failure. Which failures are worth retrying is the caller's classification:
//! it calls [`Retry::after_failure`] only for those, or hands a `retryable` rule to [`Retry::run`].

use std::future::Future;
use std::time::Duration;

use futures::future::Either;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::metrics;

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

/// One retried operation: how often and how long it may be tried, and what it has failed so far.
#[derive(Debug)]
pub struct Retry {
    /// The `stage` label of `loginflow_errors_total` and `loginflow_retries_total`.
    stage: &'static str,
    backoff: Backoff,
    attempts: Option<u32>,
    deadline: Option<tokio::time::Instant>,
    failures: u32,
}

/// Why [`Retry::after_failure`] says to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The attempts or the deadline are spent.
    GaveUp,
    /// The caller's stop token fired.
    Stopped,
}

impl Retry {
    /// Retried without end (until stopped), backoff capped at `max_backoff`.
    pub fn new(stage: &'static str, max_backoff: Duration) -> Retry {
        Retry { stage, backoff: Backoff::new(max_backoff), attempts: None, deadline: None, failures: 0 }
    }

    /// At most `attempts` tries in all.
    pub fn attempts(mut self, attempts: u32) -> Retry {
        self.attempts = Some(attempts);
        self
    }

    /// No retry starts later than `within` from now.
    pub fn deadline(mut self, within: Duration) -> Retry {
        self.deadline = Some(tokio::time::Instant::now() + within);
        self
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts the backoff over.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.backoff.reset();
    }

    /// Counts a retryable failure (`loginflow_errors_total{kind="transient"}`, `loginflow_retries_total`),
    /// logs it with `what` failed, and sleeps the next delay. `Err` when no retry is left (counted
    /// as `gave_up`) or `stop` fired; then it does not sleep.
    pub fn after_failure<'a>(
        &'a mut self,
        err: &(dyn std::error::Error + 'static),
        what: &str,
        stop: Option<&'a CancellationToken>,
    ) -> impl Future<Output = Result<(), Stop>> + Send + 'a {
        // Logged before the wait, so the error is not held across it (the future stays `Send`).
        self.failures += 1;
        let delay = self.backoff.next_delay();
        let spent = self.attempts.is_some_and(|attempts| self.failures >= attempts)
            || self.deadline.is_some_and(|deadline| tokio::time::Instant::now() + delay > deadline);
        if spent {
            metrics::error(self.stage, "gave_up");
            tracing::warn!(error = %crate::errors::error_chain(err), failures = self.failures, "{what} failed; giving up");
            return Either::Left(std::future::ready(Err(Stop::GaveUp)));
        }
        tracing::warn!(error = %crate::errors::error_chain(err), ?delay, failures = self.failures, "{what} failed; retrying");
        Either::Right(self.wait(delay, stop))
    }

    /// [`Retry::after_failure`] for a caller that logs the failure itself (with more to say of it):
    /// counts it and sleeps the next delay, however many failures came before.
    pub async fn pause(&mut self, stop: Option<&CancellationToken>) -> Result<(), Stop> {
        self.failures += 1;
        let delay = self.backoff.next_delay();
        self.wait(delay, stop).await
    }

    async fn wait(&self, delay: Duration, stop: Option<&CancellationToken>) -> Result<(), Stop> {
        metrics::error(self.stage, "transient");
        metrics::retry(self.stage);
        let never = CancellationToken::new();
        let stop = stop.unwrap_or(&never);
        tokio::select! {
            () = stop.cancelled() => Err(Stop::Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// Runs `operation` until it succeeds, fails in a way `retryable` says will not change, or no
    /// retry is left; the last error is returned then.
    pub async fn run<T, E, F, Fut>(
        mut self,
        what: &str,
        mut operation: F,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        E: std::error::Error + 'static,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            match operation().await {
                Ok(value) => return Ok(value),
                Err(err) if !retryable(&err) => return Err(err),
                Err(err) => {
                    if self.after_failure(&err, what, None).await.is_err() {
                        return Err(err);
                    }
                }
            }
        }
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

    fn failure() -> std::io::Error {
        std::io::Error::other("refused")
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_bound_the_tries_and_a_success_starts_over() {
        let mut retry = Retry::new("test", Duration::from_secs(1)).attempts(3);
        assert_eq!(retry.after_failure(&failure(), "call", None).await, Ok(()));
        assert_eq!(retry.after_failure(&failure(), "call", None).await, Ok(()));
        assert_eq!(retry.after_failure(&failure(), "call", None).await, Err(Stop::GaveUp));
        retry.succeeded();
        assert_eq!(retry.failures(), 0);
        assert_eq!(retry.after_failure(&failure(), "call", None).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_ends_the_retries_and_a_stop_ends_the_wait() {
        let started = tokio::time::Instant::now();
        let mut retry = Retry::new("test", Duration::from_secs(10)).deadline(Duration::from_secs(5));
        while retry.after_failure(&failure(), "call", None).await.is_ok() {}
        assert!(started.elapsed() <= Duration::from_secs(5));
        let stop = CancellationToken::new();
        stop.cancel();
        let mut forever = Retry::new("test", Duration::from_secs(10));
        assert_eq!(forever.after_failure(&failure(), "call", Some(&stop)).await, Err(Stop::Stopped));
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_a_failure_that_will_not_change() {
        let mut calls = 0;
        let result: Result<(), std::io::Error> = Retry::new("test", Duration::from_secs(1))
            .run(
                "call",
                || {
                    calls += 1;
                    let kind =
                        if calls < 3 { std::io::ErrorKind::TimedOut } else { std::io::ErrorKind::PermissionDenied };
                    std::future::ready(Err(std::io::Error::from(kind)))
                },
                |err| err.kind() == std::io::ErrorKind::TimedOut,
            )
            .await;
        assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(calls, 3);
    }
}
