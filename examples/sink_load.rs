//! The load test's sink measurement: writes rows exported from `user_logins` (CSV, in the
//! column order below) through loginflow's sink, BATCH_MAX_ROWS per transaction and
//! SINK_CONNECTIONS transactions at once, as the pipeline does. Prints rows per second.
//!
//! `sink_load <csv> <database-url> [batch-rows] [connections]`

use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use loginflow::records::MaskedLogin;
use loginflow::sink::Sink;

/// Column order of the CSV: `message_id, user_id, device_type, masked_ip, masked_device_id, locale,
/// app_version, app_version_text, sent_at, create_date` (as `scripts/loadtest.sh` exports it; the sink
/// derives create_date from sent_at itself).
fn parse(line: &str) -> MaskedLogin {
    let f: Vec<&str> = line.split(',').collect();
    MaskedLogin {
        message_id: f[0].into(),
        user_id: f[1].into(),
        device_type: f[2].into(),
        masked_ip: f[3].into(),
        masked_device_id: f[4].into(),
        locale: (!f[5].is_empty()).then(|| f[5].into()),
        app_version: f[6].parse().expect("app_version"),
        app_version_text: f[7].into(),
        sent_at: DateTime::parse_from_rfc3339(f[8]).expect("sent_at").with_timezone(&Utc),
        mask_key_id: "loadtest".into(),
        sealed: None,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, csv, url, rest @ ..] = args.as_slice() else {
        panic!("usage: sink_load <csv> <database-url> [batch-rows] [connections]");
    };
    let batch: usize = rest.first().map_or(1000, |v| v.parse().expect("batch rows"));
    let connections: usize = rest.get(1).map_or(2, |v| v.parse().expect("connections"));
    let rows: Vec<MaskedLogin> = std::fs::read_to_string(csv).expect("csv").lines().map(parse).collect();
    let sink = Sink::new(url.parse().expect("database url"), connections);
    sink.migrate().await.expect("migrate");
    let started = Instant::now();
    let written: u64 = futures::stream::iter(rows.chunks(batch))
        .map(|chunk| {
            let sink = sink.clone();
            async move { sink.write(chunk, &[], &Default::default()).await.expect("write").written }
        })
        .buffer_unordered(connections)
        .fold(0, |sum, n| async move { sum + n })
        .await;
    let secs = started.elapsed().as_secs_f64();
    println!("{written} {secs:.3} {:.0}", written as f64 / secs);
}
