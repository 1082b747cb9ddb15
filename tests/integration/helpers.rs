#![allow(dead_code)] // shared by the integration and chaos test binaries; each uses a part
//! Test fixtures: every test gets its own database and its own queue on the real
//! PostgreSQL and SQS emulator started by `scripts/test.sh`.

use std::time::Duration;

use aws_sdk_sqs::Client;
use clap::Parser;
use loginflow::config::{Cli, Command, RunArgs, SqsArgs};
use loginflow::sink::Sink;
use loginflow::RunSummary;

/// The masking key of every test.
pub const MASK_KEY: &str = "integration-test-key-0123456789abcdef";
/// The longest any single drain may take before the test fails.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the integration tests through scripts/test.sh, which starts PostgreSQL and the SQS emulator")
    })
}

/// One test's private database and queue.
pub struct TestEnv {
    pub database_url: String,
    pub queue_url: String,
    pub endpoint: String,
    pub sqs: Client,
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl TestEnv {
    /// A fresh database (no schema yet) and a fresh queue with a dead-letter queue.
    pub async fn new() -> TestEnv {
        TestEnv::on_server(&required_env("LOGINFLOW_TEST_DATABASE_URL")).await
    }

    /// A fresh database on the server of `admin_url` (its query parameters, TLS ones
    /// included, are kept in the test's URL) and a fresh queue.
    pub async fn on_server(admin_url: &str) -> TestEnv {
        let endpoint = required_env("AWS_ENDPOINT_URL");
        let id = short_id();
        let database = format!("lf_{id}");
        let admin = connect(admin_url).await;
        admin.batch_execute(&format!("CREATE DATABASE {database}")).await.expect("create test database");
        let (url, query) = admin_url.split_once('?').map_or((admin_url, String::new()), |(u, q)| (u, format!("?{q}")));
        let (base, _) = url.rsplit_once('/').expect("database URL has a path");
        let database_url = format!("{base}/{database}{query}");

        let sqs = loginflow::sqs::client(&sqs_args(&endpoint, "http://unused/0/unused").access()).await;
        let queue_url =
            loginflow::commands::seed::ensure_queue(&sqs, &format!("test-{id}"), 5).await.expect("create queue");
        TestEnv { database_url, queue_url, endpoint, sqs }
    }

    /// `loginflow run --drain` arguments for this environment, plus `extra` flags.
    pub fn run_args(&self, extra: &[&str]) -> RunArgs {
        let mut argv = vec![
            "loginflow",
            "run",
            "--drain",
            "--queue-url",
            &self.queue_url,
            "--aws-endpoint-url",
            &self.endpoint,
            "--database-url",
            &self.database_url,
            "--mask-key",
            MASK_KEY,
            "--metrics-addr",
            "127.0.0.1:0",
            "--receive-wait-secs",
            "1",
            "--batch-max-wait-ms",
            "200",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("test arguments parse").command {
            Command::Run(args) => *args,
            _ => unreachable!("argv starts with run"),
        }
    }

    /// Environment variables for running the `loginflow` binary against this environment.
    pub fn binary_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("QUEUE_URL", self.queue_url.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("DATABASE_URL", self.database_url.clone()),
            ("MASK_KEY", MASK_KEY.to_owned()),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("RECEIVE_WAIT_SECS", "1".to_owned()),
        ]
    }

    /// Runs the pipeline in-process until the queue is drained.
    pub async fn drain(&self, extra: &[&str]) -> RunSummary {
        let run = loginflow::run(self.run_args(extra).settings().expect("test settings"), std::future::pending());
        tokio::time::timeout(DRAIN_TIMEOUT, run).await.expect("drain finished in time").expect("run succeeded")
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.database_url).await
    }

    /// The sink of this environment's database, schema created.
    pub async fn migrated_sink(&self) -> Sink {
        let sink = Sink::new(self.database_url.parse().expect("test database URL"), 2);
        sink.migrate().await.expect("migrate");
        sink
    }

    /// Sends bodies with loginflow's own publisher, ten per call.
    pub async fn publish(&self, bodies: Vec<String>) {
        let n = bodies.len();
        let sent = loginflow::commands::seed::publish(&self.sqs, &self.queue_url, bodies).await.expect("publish");
        assert_eq!(sent, n);
    }

    /// Sends bodies ten per call and returns every message id.
    pub async fn publish_with_ids(&self, bodies: &[String]) -> Vec<String> {
        self.publish_delayed(bodies, 0).await
    }

    /// Sends bodies ten per call, invisible for `delay_secs`, and returns every message id.
    pub async fn publish_delayed(&self, bodies: &[String], delay_secs: i32) -> Vec<String> {
        let mut ids = Vec::with_capacity(bodies.len());
        for chunk in bodies.chunks(10) {
            let entries = chunk.iter().enumerate().map(|(i, body)| {
                aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .delay_seconds(delay_secs)
                    .build()
                    .unwrap()
            });
            let out = self
                .sqs
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries.collect()))
                .send()
                .await
                .expect("send batch");
            assert!(out.failed.is_empty(), "send failures: {:?}", out.failed);
            ids.extend(out.successful.into_iter().map(|e| e.message_id));
        }
        ids
    }

    /// Every message id in `user_logins` and `user_logins_quarantine`, with how often it occurs.
    pub async fn stored_ids(&self) -> std::collections::HashMap<String, i64> {
        let db = self.db().await;
        let rows = db
            .query(
                "SELECT message_id, count(*) FROM (SELECT message_id FROM user_logins
                   UNION ALL SELECT message_id FROM user_logins_quarantine) s GROUP BY message_id",
                &[],
            )
            .await
            .expect("stored ids");
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// Asserts every sent id is stored exactly once, nothing else is stored, and the queue is empty.
    pub async fn assert_exactly_once(&self, sent: &[String]) -> (usize, usize) {
        self.assert_each_once(sent, &[]).await
    }

    /// The dead-letter queue's URL (made by `seed::ensure_queue` beside the queue).
    pub async fn dlq_url(&self) -> String {
        let queue = self.queue_url.rsplit('/').next().unwrap();
        let name = match queue.strip_suffix(".fifo") {
            Some(base) => format!("{base}-dlq.fifo"),
            None => format!("{queue}-dlq"),
        };
        self.sqs.get_queue_url().queue_name(name).send().await.expect("dlq").queue_url.expect("dlq url")
    }

    /// Receives and deletes everything in the dead-letter queue; returns the message ids.
    pub async fn take_dead_letters(&self) -> Vec<String> {
        let dlq = self.dlq_url().await;
        let mut ids = Vec::new();
        let mut empty_polls = 0;
        while empty_polls < 2 {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&dlq)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .expect("receive from the dlq");
            let messages = out.messages.unwrap_or_default();
            empty_polls = if messages.is_empty() { empty_polls + 1 } else { 0 };
            for message in messages {
                ids.push(message.message_id.unwrap_or_default());
                let receipt = message.receipt_handle.unwrap_or_default();
                self.sqs.delete_message().queue_url(&dlq).receipt_handle(receipt).send().await.expect("delete");
            }
        }
        ids
    }

    /// Asserts every sent id ends exactly once as a row, a quarantine record or (exactly the ids
    /// of `dead_letters`) a dead-letter message, and the queue is empty. Returns `(lost, duplicated)`.
    /// The unique index already forbids two rows of one id, so `duplicated` counts what it does not:
    /// an id both written and quarantined, or stored and dead-lettered, or dead-lettered twice.
    pub async fn assert_each_once(&self, sent: &[String], dead_letters: &[String]) -> (usize, usize) {
        let stored = self.stored_ids().await;
        let dead: std::collections::HashSet<&String> = dead_letters.iter().collect();
        let sent_set: std::collections::HashSet<&String> = sent.iter().collect();
        assert_eq!(sent_set.len(), sent.len(), "SQS gave two messages one id");
        let lost = sent.iter().filter(|id| !stored.contains_key(*id) && !dead.contains(id)).count();
        let duplicated = stored.values().filter(|n| **n > 1).count()
            + dead_letters.len().saturating_sub(dead.len())
            + dead.iter().filter(|id| stored.contains_key(**id)).count();
        let unexpected = stored.keys().chain(dead_letters).filter(|id| !sent_set.contains(id)).count();
        assert_eq!((lost, duplicated, unexpected), (0, 0, 0), "lost, duplicated, unexpected of {} sent", sent.len());
        self.assert_queue_empty().await;
        (lost, duplicated)
    }

    /// Sends each body on its own and returns the message ids, in order.
    pub async fn send_each(&self, bodies: &[String]) -> Vec<String> {
        let mut ids = Vec::new();
        for body in bodies {
            let out = self.sqs.send_message().queue_url(&self.queue_url).message_body(body).send().await.expect("send");
            ids.push(out.message_id.expect("message id"));
        }
        ids
    }

    /// Asserts the queue holds nothing visible, in flight or delayed.
    pub async fn assert_queue_empty(&self) {
        let depth = loginflow::sqs::queue_depth(&self.sqs, &self.queue_url).await.expect("queue depth");
        assert!(depth.is_empty(), "queue not empty: {depth:?}");
    }
}

pub fn sqs_args(endpoint: &str, queue_url: &str) -> SqsArgs {
    SqsArgs {
        queue_url: queue_url.to_owned(),
        aws_endpoint_url: Some(endpoint.to_owned()),
        aws_region: Some("us-east-1".to_owned()),
        aws_access_key_id: None,
        aws_secret_access_key: None,
    }
}

/// A connection with loginflow's own parsing of the URL (so TLS parameters work too).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let database: loginflow::sink::Database = url.parse().expect("test database URL");
    let (client, connection) = database.config.connect(database.tls).await.expect("connect to postgres");
    tokio::spawn(connection);
    client
}

/// The expected mask, computed independently of loginflow's masker.
pub fn hmac_hex(value: &str) -> String {
    hmac_hex_with(MASK_KEY, value)
}

/// The expected mask under `key`.
pub fn hmac_hex_with(key: &str, value: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Every row of both tables as text, for leak scans.
pub async fn dump_tables(db: &tokio_postgres::Client) -> String {
    let mut text = String::new();
    for table in ["user_logins", "user_logins_quarantine"] {
        for row in db.query(&format!("SELECT t::text FROM {table} t"), &[]).await.expect("dump") {
            text.push_str(row.get::<_, &str>(0));
            text.push('\n');
        }
    }
    text
}

/// Runs the `loginflow` binary against `env` with `args`, plus `extra_env`.
pub async fn run_binary(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_loginflow"));
    command
        .args(args)
        .envs(env.binary_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    tokio::time::timeout(DRAIN_TIMEOUT, command.output()).await.expect("binary finished in time").expect("binary ran")
}

/// Synthetic bodies from the project's generator.
pub fn synthetic_bodies(count: u64, seed: u64) -> Vec<String> {
    loginflow::commands::seed::synthetic(count, seed).map(|v| v.to_string()).collect()
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A minimal HTTP/1.0 GET: `(status, body)`, or `None` while nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}
