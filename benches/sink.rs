//! Sink benches against a real PostgreSQL (set DATABASE_URL to a server where the bench may
//! create the database `loginflow_bench_sink`): the binary COPY loginflow uses at several batch
//! sizes, the UNNEST insert, and both with one redelivered (already stored) row in the batch,
//! which sends COPY down its fallback. Run: `DATABASE_URL=... cargo bench --bench sink`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use loginflow::decode::decode;
use loginflow::masker::Masker;
use loginflow::records::{MaskedLogin, MessageMeta};
use loginflow::sink::{Sink, WriteMethod};
use secrecy::SecretString;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DATABASE: &str = "loginflow_bench_sink";
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// `n` masked rows with fresh message ids.
fn rows(n: usize) -> Vec<MaskedLogin> {
    let masker = Masker::new(&SecretString::from("bench-key-bench-key-bench-key-0123"));
    loginflow::commands::seed::synthetic(n as u64 * 2, NEXT_ID.load(Ordering::Relaxed))
        .filter_map(|v| decode(&v.to_string()).ok())
        .take(n)
        .map(|login| {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            masker.mask_login(login, MessageMeta { message_id: format!("bench-{id:012}"), sent_at: Utc::now() })
        })
        .collect()
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

fn sink(c: &mut Criterion) {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        eprintln!("sink bench skipped: set DATABASE_URL to a PostgreSQL server (scripts/loadtest.sh does)");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let url = format!("{base}/{DATABASE}");
    let sink = runtime.block_on(async {
        let admin = connect(&admin_url).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE}")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {DATABASE}")).await.unwrap();
        let sink = Sink::new(url.parse().unwrap(), 1);
        sink.migrate().await.unwrap();
        sink
    });
    let stored = rows(10);
    runtime.block_on(sink.write(&stored, &[], &Default::default())).unwrap();

    let mut group = c.benchmark_group("sink");
    let mut bench = |name: &str, method: WriteMethod, batch: usize, redelivered: usize| {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, &batch| {
            b.to_async(&runtime).iter_batched(
                || {
                    let mut rows = rows(batch);
                    // A redelivery: a message already stored by an earlier batch.
                    rows.truncate(batch - redelivered);
                    rows.extend(stored.iter().take(redelivered).cloned());
                    rows
                },
                |rows| {
                    let sink = sink.clone();
                    async move { sink.write_using(method, &rows, &[], &Default::default()).await.unwrap() }
                },
                BatchSize::LargeInput,
            )
        });
    };
    for batch in [100, 1_000, 5_000] {
        bench("copy", WriteMethod::Copy, batch, 0);
    }
    bench("unnest_insert", WriteMethod::UnnestInsert, 1_000, 0);
    bench("copy_with_a_redelivery", WriteMethod::Copy, 1_000, 1);
    bench("unnest_insert_with_a_redelivery", WriteMethod::UnnestInsert, 1_000, 1);
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(20);
    targets = sink
}
criterion_main!(benches);
