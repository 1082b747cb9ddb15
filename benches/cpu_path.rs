//! CPU path benches: decode + validate, dedup (hit and miss), mask, and the whole path
//! (decode + validate + dedup + mask + windowing) over a realistic mix, on one and two threads,
//! with the PII vault off and on (sealing with an in-memory data key: KMS is asked once per
//! rotation interval, never per message, so it has no place on this path).
//! No I/O. Run: `cargo bench --bench cpu_path`.

use std::time::Duration;

// As in the binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use loginflow::decode::decode;
use loginflow::dedup::Dedup;
use loginflow::mask::{Item, Masking};
use loginflow::masker::Masker;
use loginflow::records::MessageMeta;
use loginflow::source::envelope::InputFormat;
use loginflow::source::{Ack, Envelope};
use loginflow::sqs::SQS_BATCH_LIMIT;
use loginflow::vault::{DataKey, Vault};
use secrecy::SecretString;

const MESSAGES: usize = 10_000;
/// One in ten messages is a redelivery of a committed one.
const DUPLICATE_EVERY: usize = 10;
const WINDOW_ROWS: usize = 1_000;

/// The task sample's mix (1 % malformed, 29 % null locale, three version forms) plus 10 % redeliveries.
fn envelopes() -> Vec<Envelope> {
    loginflow::commands::seed::synthetic(MESSAGES as u64, 7)
        .enumerate()
        .map(|(i, body)| {
            let id = if i % DUPLICATE_EVERY == 0 { format!("committed-{i}") } else { format!("m-{i}") };
            Envelope {
                ack: Ack { message_id: id, receipt_handle: format!("receipt-{i}").into() },
                body: body.to_string(),
                sent_at: Utc::now(),
                share: None,
                forged_copy_id: false,
            }
        })
        .collect()
}

/// The dedup and mask stages' work on a batch, without their streams.
struct Transform {
    dedup: Dedup,
    masking: Masking,
}

impl Transform {
    fn process(&self, batch: Vec<Envelope>) -> Vec<Item> {
        self.masking.process(self.dedup.key_batch(batch, InputFormat::Auto))
    }
}

fn transform(vault: bool) -> Transform {
    let masker = Masker::new(&SecretString::from("bench-key-bench-key-bench-key-0123"));
    let dedup = Dedup::new(200_000, Duration::from_secs(3600));
    let committed: Vec<u128> =
        (0..MESSAGES).step_by(DUPLICATE_EVERY).map(|i| Dedup::fingerprint(&format!("committed-{i}"))).collect();
    dedup.mark_committed(committed);
    let vault = vault.then(|| {
        let kms = aws_sdk_kms::Client::from_conf(
            aws_sdk_kms::Config::builder()
                .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
                .region(aws_sdk_kms::config::Region::new("us-east-1"))
                .build(),
        );
        let key = DataKey::from_plaintext(uuid::Uuid::new_v4(), vec![9u8; 32]).unwrap();
        std::sync::Arc::new(Vault::with_data_key(kms, "alias/bench".into(), key))
    });
    Transform { dedup, masking: Masking { masker, vault } }
}

/// The pipeline's shape: receive batches of 10 in, windows of 1 000 items out.
fn cpu_path(transform: &Transform, messages: Vec<Envelope>) -> Vec<Vec<Item>> {
    let mut windows = Vec::new();
    let mut window = Vec::with_capacity(WINDOW_ROWS);
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let batch: Vec<Envelope> = messages.by_ref().take(10).collect();
        for item in transform.process(batch) {
            window.push(item);
            if window.len() == WINDOW_ROWS {
                windows.push(std::mem::replace(&mut window, Vec::with_capacity(WINDOW_ROWS)));
            }
        }
    }
    windows.push(window);
    windows
}

fn stages(c: &mut Criterion) {
    let transform = transform(false);
    let messages = envelopes();
    let bodies: Vec<String> = messages.iter().map(|e| e.body.clone()).collect();

    let mut group = c.benchmark_group("stages");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("decode_validate", |b| b.iter(|| bodies.iter().filter(|body| decode(body).is_ok()).count()));
    group.bench_function("dedup_miss", |b| {
        b.iter(|| {
            messages.iter().filter(|e| transform.dedup.is_committed(Dedup::fingerprint(&e.ack.message_id))).count()
        })
    });
    let hits: Vec<String> =
        (0..MESSAGES).map(|i| format!("committed-{}", i / DUPLICATE_EVERY * DUPLICATE_EVERY)).collect();
    group.bench_function("dedup_hit", |b| {
        b.iter(|| hits.iter().filter(|id| transform.dedup.is_committed(Dedup::fingerprint(id))).count())
    });
    // What the ack stage does after each delete batch: remember its ids (a full cache: the oldest go).
    let fingerprints: Vec<u128> = messages.iter().map(|e| Dedup::fingerprint(&e.ack.message_id)).collect();
    group.bench_function("dedup_commit", |b| {
        b.iter_batched(
            || {
                let full = Dedup::new(MESSAGES as u64, Duration::from_secs(3600));
                full.mark_committed((0..MESSAGES as u128).map(|i| i << 64));
                full
            },
            |dedup| {
                fingerprints.chunks(SQS_BATCH_LIMIT).for_each(|batch| dedup.mark_committed(batch.iter().copied()));
                dedup
            },
            BatchSize::LargeInput,
        )
    });
    let valid: Vec<_> = bodies.iter().filter_map(|body| decode(body).ok()).collect();
    group.throughput(Throughput::Elements(valid.len() as u64));
    group.bench_function("mask", |b| {
        b.iter_batched(
            || valid.clone(),
            |logins| {
                logins
                    .into_iter()
                    .map(|login| {
                        transform
                            .masking
                            .masker
                            .mask_login(login, MessageMeta { message_id: "m".into(), sent_at: Utc::now() })
                    })
                    .collect::<Vec<_>>()
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("cpu_path");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    let sealing = self::transform(true);
    for (name, transform) in [("", &transform), ("_vault", &sealing)] {
        group.bench_function(format!("one_thread{name}"), |b| {
            b.iter_batched(envelopes, |messages| cpu_path(transform, messages), BatchSize::LargeInput)
        });
        two_threads(&mut group, &format!("two_threads{name}"), transform);
    }
    group.finish();
}

fn two_threads(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    transform: &Transform,
) {
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                let mut first = envelopes();
                let second = first.split_off(MESSAGES / 2);
                (first, second)
            },
            |(first, second)| {
                std::thread::scope(|scope| {
                    let a = scope.spawn(|| cpu_path(transform, first));
                    let b = cpu_path(transform, second);
                    (a.join().unwrap(), b)
                })
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(30);
    targets = stages
}
criterion_main!(benches);
