//! What the dedup cache costs in memory: RSS before and after filling a cache of N entries
//! (`cargo run --release --example dedup_memory -- 50000 100000 200000`), and the time of the
//! stage's lookups and per-delete-batch inserts at that size.

use std::time::{Duration, Instant};

use loginflow::dedup::Dedup;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = status.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() {
    let sizes: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![50_000, 100_000, 200_000] } else { sizes };
    for n in sizes {
        let before = rss_bytes();
        let dedup = Dedup::new(n, Duration::from_secs(3600));
        let fingerprints: Vec<u128> = (0..n).map(|i| Dedup::fingerprint(&format!("message-{i}"))).collect();
        let keys_bytes = fingerprints.len() as u64 * 16;
        let started = Instant::now();
        for batch in fingerprints.chunks(10) {
            dedup.mark_committed(batch.iter().copied());
        }
        let insert = started.elapsed();
        let entries = dedup.entries();
        let started = Instant::now();
        let hits = fingerprints.iter().filter(|f| dedup.is_committed(**f)).count();
        let lookup = started.elapsed();
        let after = rss_bytes().saturating_sub(keys_bytes);
        println!(
            "capacity {n}: {entries} entries, {hits} hits, RSS +{:.1} MiB = {:.0} B/entry; insert {:.2} µs, lookup {:.2} µs per message",
            (after - before) as f64 / (1 << 20) as f64,
            (after - before) as f64 / entries.max(1) as f64,
            insert.as_secs_f64() * 1e6 / n as f64,
            lookup.as_secs_f64() * 1e6 / n as f64,
        );
        drop(dedup);
    }
}
