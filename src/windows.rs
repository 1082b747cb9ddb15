//! Windows that grow with load: a window is handed to the sink when its first message has
//! waited `BATCH_MAX_WAIT_MS` (20 ms by default) or it holds `BATCH_MAX_ROWS`, as soon as a
//! connection is free. While every connection is writing, it keeps taking what arrives (up to
//! `BATCH_MAX_ROWS`), so a quiet stream is written within milliseconds in small windows and a
//! busy one in large windows, without a fixed timer deciding the size.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Feeds `items` to `write` in windows; at most `connections` writes run at once, and each
/// holds its connection's permit (the write drops it once the connection is free again).
/// Returns when `items` ends and every write has finished.
pub async fn write_in_windows<T, S, W, F>(items: S, max_rows: usize, max_wait: Duration, connections: usize, write: W)
where
    S: Stream<Item = T>,
    W: Fn(Vec<T>, OwnedSemaphorePermit) -> F,
    F: Future<Output = ()>,
{
    let slots = Arc::new(Semaphore::new(connections));
    let mut writing = FuturesUnordered::new();
    let mut window: Vec<T> = Vec::new();
    let mut first_at = Instant::now();
    let mut upstream_open = true;
    tokio::pin!(items);
    while upstream_open || !window.is_empty() {
        let due = !window.is_empty() && (window.len() >= max_rows || first_at.elapsed() >= max_wait || !upstream_open);
        tokio::select! {
            // Order matters: finished writes first, then a due window, then whatever arrives.
            biased;
            Some(()) = writing.next(), if !writing.is_empty() => {}
            permit = slots.clone().acquire_owned(), if due => {
                let permit = permit.expect("the semaphore is never closed");
                writing.push(write(std::mem::take(&mut window), permit));
            }
            item = items.next(), if upstream_open && window.len() < max_rows => match item {
                Some(item) => {
                    if window.is_empty() {
                        first_at = Instant::now();
                    }
                    window.push(item);
                }
                None => upstream_open = false,
            },
            () = tokio::time::sleep_until(first_at + max_wait), if !window.is_empty() && !due => {}
        }
    }
    while writing.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    async fn windows_of(
        items: impl Stream<Item = u32>,
        max_rows: usize,
        connections: usize,
        write_time: Duration,
    ) -> Vec<Vec<u32>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        write_in_windows(items, max_rows, Duration::from_millis(20), connections, |window, permit| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(window);
                tokio::time::sleep(write_time).await;
                drop(permit);
            }
        })
        .await;
        let windows = seen.lock().unwrap().clone();
        windows
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_is_written_within_the_wait_in_small_windows() {
        // One item every 100 ms, a 20 ms wait, writes of 5 ms: each item goes out alone, 20 ms after it came.
        let items = futures::stream::iter(0..5).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            i
        });
        let started = Instant::now();
        let windows = windows_of(items, 1000, 2, Duration::from_millis(5)).await;
        assert_eq!(windows, vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
        assert!(started.elapsed() < Duration::from_millis(530), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn windows_grow_while_every_connection_is_busy() {
        // One item every ms, writes of 50 ms on one connection: windows collect what arrived meanwhile.
        let items = futures::stream::iter(0..200).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            i
        });
        let windows = windows_of(items, 1000, 1, Duration::from_millis(50)).await;
        assert!(windows[0].len() <= 21, "the first window went out after the 20 ms wait: {}", windows[0].len());
        assert!(
            windows[1].len() >= 45,
            "the second window held what arrived during the first write: {}",
            windows[1].len()
        );
        let all: Vec<u32> = windows.concat();
        assert_eq!(all, (0..200).collect::<Vec<_>>(), "every item once, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_never_exceeds_max_rows() {
        let windows = windows_of(futures::stream::iter(0..2500), 1000, 1, Duration::from_millis(10)).await;
        assert!(windows.iter().all(|w| w.len() <= 1000));
        assert_eq!(windows.concat(), (0..2500).collect::<Vec<_>>());
        assert_eq!(windows.len(), 3);
    }
}
