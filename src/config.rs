//! Command line and environment configuration, parsed and validated once at startup.
//!
//! Every setting is a CLI flag and an environment variable of the same name
//! (`--batch-max-rows` / `BATCH_MAX_ROWS`). A value that does not parse stops
//! startup with clap's error, which names the variable and what it accepts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::num::{NonZeroU64, NonZeroUsize};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pipeline::{PiiSettings, Settings};
use crate::sink::stage::WindowSettings;
use crate::source::{PollerRange, ReceiveSettings};
use secrecy::{ExposeSecret, SecretString};

/// The default queue: the one the original task publishes to.
pub const DEFAULT_QUEUE_URL: &str = "http://localhost:4566/000000000000/login-queue";
/// Shortest accepted masking key, in bytes.
pub const MIN_MASK_KEY_BYTES: usize = 32;

/// loginflow: user-login events from SQS, deduplicated and PII-masked, into PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "loginflow", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_name = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
}

/// The subcommands of the `loginflow` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline (forever, or until the queue is drained with --drain).
    Run(Box<RunArgs>),
    /// Create the queue (and its dead-letter queue) if missing and publish records to it.
    Seed(SeedArgs),
    /// Create or upgrade the database schema, then exit.
    Migrate(DatabaseArgs),
    /// Print synthetic login records as a JSON array (the shape of the task's sample).
    Generate(GenerateArgs),
    /// Move dead-lettered messages back to the queue once the cause is fixed; prints a JSON report.
    Redrive(RedriveArgs),
    /// Open sealed PII from the vault (needs kms:Decrypt); one JSON line per row; audited.
    Reveal(RevealArgs),
    /// Erase a user's sealed PII from the vault (masks stay); audited.
    Forget(ForgetArgs),
    /// Mask-key rotation: re-mask every row from the vault under the current MASK_KEY (needs
    /// kms:Decrypt); online, in batches, resumable; prints a JSON report; audited.
    Remask(RemaskArgs),
    /// Quarantined messages.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
}

/// `loginflow quarantine ...`.
#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Re-run quarantined messages from their sealed bodies through today's validator: those
    /// that pass become rows and leave quarantine, the rest stay with their new reason.
    /// Idempotent; needs kms:Decrypt; prints a JSON report; audited.
    Replay(ReplayArgs),
}

/// What the vault's batch jobs (`remask`, `quarantine replay`) need.
#[derive(Debug, Clone, Args)]
pub struct VaultJobArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// AWS settings for KMS (QUEUE_URL is not used).
    #[command(flatten)]
    pub aws: SqsArgs,
    /// The masking key rows are (re-)masked with.
    #[command(flatten)]
    pub mask: MaskKeyArgs,
    /// The clear quarantine copies' size limit, as `run` keeps them.
    #[command(flatten)]
    pub copy: QuarantineCopyArgs,
    /// Rows per transaction (1..=10000): each batch commits on its own, so the job can be
    /// stopped at any point and run again.
    #[arg(long, value_name = "N", default_value = "500", value_parser = count(1, 10_000))]
    pub batch_rows: usize,
}

/// `loginflow remask`.
#[derive(Debug, Clone, Args)]
pub struct RemaskArgs {
    #[command(flatten)]
    pub job: VaultJobArgs,
    /// Why (recorded in pii_access_log).
    #[arg(long, value_name = "TEXT", value_parser = non_empty, default_value = "mask key rotation")]
    pub why: String,
}

/// `loginflow quarantine replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub job: VaultJobArgs,
    /// Replay only the messages quarantined for this reason code (e.g. `db_rejected`).
    #[arg(long, value_name = "REASON")]
    pub reason: Option<String>,
    /// How sealed bodies are read, as `run` reads them.
    #[arg(long, env = "INPUT_FORMAT", value_name = "INPUT_FORMAT", default_value = "auto")]
    pub input_format: crate::source::envelope::InputFormat,
    /// Why (recorded in pii_access_log).
    #[arg(long, value_name = "TEXT", value_parser = non_empty, default_value = "quarantine replay")]
    pub why: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the queue is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct SqsArgs {
    /// SQS queue URL.
    #[arg(long, env = "QUEUE_URL", value_name = "QUEUE_URL", default_value = DEFAULT_QUEUE_URL)]
    pub queue_url: String,

    /// SQS endpoint, for an emulator such as LocalStack. Unset means AWS itself.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,

    /// AWS region. Unset: the region in QUEUE_URL's host name, else the standard chain
    /// (profile, instance or container metadata), else us-east-1.
    #[arg(long, env = "AWS_REGION", value_name = "AWS_REGION")]
    pub aws_region: Option<String>,

    /// AWS access key id. With an endpoint set and no key, the emulator's "test" key is used.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", value_name = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<String>,

    /// AWS secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", value_name = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<SecretString>,
}

impl SqsArgs {
    /// The queue and how to reach it, as the SQS client takes them.
    pub fn access(&self) -> crate::sqs::Access {
        crate::sqs::Access {
            queue_url: self.queue_url.clone(),
            endpoint_url: self.aws_endpoint_url.clone(),
            region: self.aws_region.clone(),
            access_key_id: self.aws_access_key_id.clone(),
            secret_access_key: self.aws_secret_access_key.clone(),
        }
    }

    /// The queue's name: the last path segment of its URL.
    pub fn queue_name(&self) -> &str {
        self.queue_url.trim_end_matches('/').rsplit('/').next().unwrap_or_default()
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, `postgres://user:pass@host:port/db`.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", hide_env_values = true,
          default_value = "postgres://postgres@127.0.0.1:5432/postgres", value_parser = parse_database_url)]
    pub database_url: crate::sink::Database,
}

/// The size limit of clear quarantine copies (`run` and the vault's batch jobs).
#[derive(Debug, Clone, Args)]
pub struct QuarantineCopyArgs {
    /// Largest clear quarantine copy (`masked_body`) kept, in bytes (1024..=1048576); a longer
    /// one is cut with a marker saying so (the whole original stays sealed in the vault when it
    /// is on). Bounds what a body can swell into when its addresses become 64-character masks.
    #[arg(long, env = "QUARANTINE_COPY_MAX_BYTES", value_name = "QUARANTINE_COPY_MAX_BYTES", default_value = "65536",
          value_parser = count(1 << 10, 1 << 20))]
    pub quarantine_copy_max_bytes: usize,
}

/// The masking secret.
#[derive(Debug, Clone, Args)]
pub struct MaskKeyArgs {
    /// Masking secret (at least 32 bytes). Prefer MASK_KEY_FILE in production.
    #[arg(long, env = "MASK_KEY", value_name = "MASK_KEY", hide_env_values = true)]
    pub mask_key: Option<SecretString>,

    /// File holding the masking secret (trailing newline ignored).
    #[arg(long, env = "MASK_KEY_FILE", value_name = "MASK_KEY_FILE")]
    pub mask_key_file: Option<PathBuf>,
}

impl MaskKeyArgs {
    /// Reads and checks the masking key from MASK_KEY or MASK_KEY_FILE. Never prints it.
    pub fn load(&self) -> Result<SecretString, ConfigError> {
        let (key, variable) = match (&self.mask_key, &self.mask_key_file) {
            (Some(_), Some(_)) => return Err(ConfigError::MaskKeyTwice),
            (None, None) => return Err(ConfigError::MaskKeyMissing),
            (Some(key), None) => (key.clone(), "MASK_KEY"),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::MaskKeyFile { path: path.clone(), source })?;
                (SecretString::from(text.trim_end_matches(['\r', '\n']).to_owned()), "MASK_KEY_FILE")
            }
        };
        let len = key.expose_secret().len();
        if len < MIN_MASK_KEY_BYTES {
            return Err(ConfigError::MaskKeyTooShort { variable, len });
        }
        Ok(key)
    }
}

/// `loginflow run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub sqs: SqsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Exit 0 once the queue has no visible or in-flight messages and everything received is stored and deleted.
    #[arg(long)]
    pub drain: bool,

    /// How bodies are read: `auto` unwraps SNS envelopes it recognises, `raw` never unwraps,
    /// `sns` requires an envelope (anything else is quarantined as `invalid_envelope`).
    #[arg(long, env = "INPUT_FORMAT", value_name = "INPUT_FORMAT", default_value = "auto")]
    pub input_format: crate::source::envelope::InputFormat,

    #[command(flatten)]
    pub mask: MaskKeyArgs,

    /// `host:port` serving /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", value_name = "METRICS_ADDR", default_value = "127.0.0.1:9898")]
    pub metrics_addr: SocketAddr,

    /// A fixed number of long-polling receivers (1..=256); unset, the number adapts between
    /// MIN_POLLERS and MAX_POLLERS.
    #[arg(long, env = "POLLERS", value_name = "POLLERS", value_parser = count(1, 256))]
    pub pollers: Option<usize>,

    /// Fewest long-polling receivers (1..=256): what runs while the queue is empty.
    #[arg(long, env = "MIN_POLLERS", value_name = "MIN_POLLERS", default_value = "1", value_parser = count(1, 256))]
    pub min_pollers: usize,

    /// Most long-polling receivers (1..=256): one is added while every receiver's last receive
    /// came back full (a backlog, or long round trips) and the last one added throughput; one
    /// retires after an empty long poll, or when the last one added did not pay.
    #[arg(long, env = "MAX_POLLERS", value_name = "MAX_POLLERS", default_value = "16", value_parser = count(1, 256))]
    pub max_pollers: usize,

    /// Long-poll wait per receive, 1..=20 seconds (0 would poll an empty queue in a busy loop).
    #[arg(long, env = "RECEIVE_WAIT_SECS", value_name = "RECEIVE_WAIT_SECS", default_value = "20",
          value_parser = clap::value_parser!(u8).range(1..=20))]
    pub receive_wait_secs: u8,

    /// Visibility timeout requested on receive, and the length of each extension, 1..=43200 seconds.
    #[arg(long, env = "VISIBILITY_TIMEOUT_SECS", value_name = "VISIBILITY_TIMEOUT_SECS", default_value = "60",
          value_parser = clap::value_parser!(u32).range(1..=43_200))]
    pub visibility_timeout_secs: u32,

    /// Most rows per window (1..=10000): a window is written when it has this many messages...
    #[arg(long, env = "BATCH_MAX_ROWS", value_name = "BATCH_MAX_ROWS", default_value = "1000",
          value_parser = count(1, 10_000))]
    pub batch_max_rows: usize,

    /// ...or when its first message has waited this long, in milliseconds (1..=600000), as soon as
    /// a sink connection is free; while all are busy the window keeps growing (up to BATCH_MAX_ROWS).
    #[arg(long, env = "BATCH_MAX_WAIT_MS", value_name = "BATCH_MAX_WAIT_MS", default_value = "20",
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub batch_max_wait_ms: u64,

    /// How long a committed message is remembered by the dedup cache, in seconds (1..=1209600).
    #[arg(long, env = "DEDUP_TTL_SECS", value_name = "DEDUP_TTL_SECS", default_value = "3600",
          value_parser = clap::value_parser!(u64).range(1..=1_209_600))]
    pub dedup_ttl_secs: u64,

    /// Most entries the dedup cache holds (1..=10000000; about 225-300 bytes each, measured). The
    /// default covers one visibility timeout of redeliveries at ~830 msg/s (BENCHMARKS.md).
    #[arg(long, env = "DEDUP_CAPACITY", value_name = "DEDUP_CAPACITY", default_value = "50000",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub dedup_capacity: u64,

    /// Receive batches decoded and masked at once (1..=64), each by the poller that received it
    /// (large ones on blocking threads).
    #[arg(long, env = "MASK_CONCURRENCY", value_name = "MASK_CONCURRENCY", default_value = "4",
          value_parser = count(1, 64))]
    pub mask_concurrency: usize,

    /// Tokio worker threads the pipeline runs on (1..=256). One is the cheapest per message (no
    /// hand-offs between threads) and carries several thousand messages a second (BENCHMARKS.md).
    /// Raise it when one process must carry more; or run more replicas.
    #[arg(long, env = "WORKER_THREADS", value_name = "WORKER_THREADS", default_value = "1",
          value_parser = count(1, 256))]
    pub worker_threads: usize,

    /// Batches written to PostgreSQL at once, one connection each (1..=64).
    #[arg(long, env = "SINK_CONNECTIONS", value_name = "SINK_CONNECTIONS", default_value = "2",
          value_parser = count(1, 64))]
    pub sink_connections: usize,

    /// Byte budget of message bodies held anywhere in the pipeline (33554432..=2147483648);
    /// pollers wait while it is spent. A receive reserves room for ten bodies of the largest
    /// size seen lately, twice (the response and the parsed bodies): up to 20 MiB.
    #[arg(long, env = "MAX_INFLIGHT_BYTES", value_name = "MAX_INFLIGHT_BYTES", default_value = "67108864",
          value_parser = count(32 << 20, 2 << 30))]
    pub max_inflight_bytes: usize,

    #[command(flatten)]
    pub copy: QuarantineCopyArgs,

    /// Deadline of one batch's write to PostgreSQL, all statements and the commit, in seconds
    /// (1..=3600); also each statement's server-side `statement_timeout`. A write past it is
    /// cancelled, rolled back and retried.
    #[arg(long, env = "FLUSH_TIMEOUT_SECS", value_name = "FLUSH_TIMEOUT_SECS", default_value = "30",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub flush_timeout_secs: u64,

    /// With --drain: give up after this many seconds (1..=604800), exiting non-zero and naming what is still held.
    #[arg(long, env = "DRAIN_TIMEOUT_SECS", value_name = "DRAIN_TIMEOUT_SECS", default_value = "1800",
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub drain_timeout_secs: u64,

    /// KMS key (id, ARN or alias) of the PII vault: raw values are sealed under data keys it
    /// wraps. Unset: the vault is off and raw values are kept nowhere.
    #[arg(long, env = "PII_KMS_KEY_ID", value_name = "PII_KMS_KEY_ID")]
    pub pii_kms_key_id: Option<String>,

    /// How often the vault asks KMS for a new data key, in seconds (60..=2592000).
    #[arg(long, env = "PII_KEY_ROTATION_SECS", value_name = "PII_KEY_ROTATION_SECS", default_value = "3600",
          value_parser = clap::value_parser!(u64).range(60..=2_592_000))]
    pub pii_key_rotation_secs: u64,

    /// After SIGINT/SIGTERM, how long in-flight work may take to finish, in seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", value_name = "SHUTDOWN_GRACE_SECS", default_value = "30",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_grace_secs: u64,

    /// Longest pause between retries of a failing call, in seconds (1..=300).
    #[arg(long, env = "RETRY_MAX_BACKOFF_SECS", value_name = "RETRY_MAX_BACKOFF_SECS", default_value = "10",
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub retry_max_backoff_secs: u64,
}

/// `loginflow seed`.
#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub sqs: SqsArgs,

    /// JSON array file whose elements are published one per message.
    #[arg(long, value_name = "PATH", conflicts_with = "count")]
    pub file: Option<PathBuf>,

    /// Publish this many synthetic records instead of a file.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Random seed of the synthetic generator.
    #[arg(long, value_name = "SEED", default_value = "42")]
    pub rng_seed: u64,

    /// Publish at most this many messages per second (default: as fast as possible).
    #[arg(long, value_name = "PER_SECOND", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: Option<u32>,

    /// Receives before a message moves to the dead-letter queue.
    #[arg(long, env = "MAX_RECEIVE_COUNT", value_name = "MAX_RECEIVE_COUNT", default_value = "5",
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_receive_count: u16,
}

/// `loginflow redrive`.
#[derive(Debug, Clone, Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub sqs: SqsArgs,

    /// Dead-letter queue to empty (default: the one QUEUE_URL's redrive policy names).
    #[arg(long, env = "DLQ_URL", value_name = "DLQ_URL")]
    pub dlq_url: Option<String>,

    /// `auto` uses SQS's message-move task and falls back to copying (receive, send, delete)
    /// where the endpoint has no move tasks.
    #[arg(long, value_enum, default_value = "auto")]
    pub method: crate::commands::redrive::Method,
}

/// `loginflow reveal`: exactly one of the lookups.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("lookup").required(true).args(["message_id", "user_id", "masked_ip", "masked_device_id"])))]
pub struct RevealArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// AWS settings for KMS (QUEUE_URL is not used).
    #[command(flatten)]
    pub aws: SqsArgs,
    /// Why the values are needed (recorded in pii_access_log).
    #[arg(long, value_name = "TEXT", value_parser = non_empty)]
    pub reason: String,
    /// Message ids to open (repeatable).
    #[arg(long, value_name = "ID")]
    pub message_id: Vec<String>,
    /// Every row of this user.
    #[arg(long, value_name = "USER_ID")]
    pub user_id: Option<String>,
    /// Every row with this masked IP: who is behind it?
    #[arg(long, value_name = "HEX")]
    pub masked_ip: Option<String>,
    /// Every row with this masked device id.
    #[arg(long, value_name = "HEX")]
    pub masked_device_id: Option<String>,
}

/// `loginflow forget`.
#[derive(Debug, Clone, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The masking key: quarantined bodies are found by the keyed fingerprint of the user id.
    #[command(flatten)]
    pub mask: MaskKeyArgs,
    /// The user whose sealed values are erased.
    #[arg(long, value_name = "USER_ID", value_parser = not_blank)]
    pub user_id: String,
    /// Why (recorded in pii_access_log).
    #[arg(long, value_name = "TEXT", value_parser = non_empty)]
    pub reason: String,
}

/// A value that is not blank, kept exactly as given (user ids may carry spaces).
fn not_blank(value: &str) -> Result<String, String> {
    match value.trim() {
        "" => Err("must not be empty".into()),
        _ => Ok(value.to_owned()),
    }
}

/// A value that is not blank, trimmed.
fn non_empty(value: &str) -> Result<String, String> {
    not_blank(value).map(|_| value.trim().to_owned())
}

/// `loginflow generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Number of records.
    #[arg(long, value_name = "N", default_value = "100")]
    pub count: u64,
    /// Random seed.
    #[arg(long, value_name = "SEED", default_value = "42")]
    pub rng_seed: u64,
}

/// Settings that failed validation beyond what clap checks.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("MASK_KEY or MASK_KEY_FILE is required: a secret of at least {MIN_MASK_KEY_BYTES} bytes")]
    MaskKeyMissing,
    #[error("MASK_KEY and MASK_KEY_FILE are both set; set only one")]
    MaskKeyTwice,
    #[error("{variable} is {len} bytes; it must be at least {MIN_MASK_KEY_BYTES} bytes")]
    MaskKeyTooShort { variable: &'static str, len: usize },
    #[error("MASK_KEY_FILE {path:?} cannot be read: {source}")]
    MaskKeyFile { path: PathBuf, source: std::io::Error },
    #[error("QUEUE_URL {0:?} is not an http(s) URL ending in the queue name")]
    QueueUrl(String),
    #[error("MIN_POLLERS ({min}) must not be more than MAX_POLLERS ({max})")]
    PollerRange { min: usize, max: usize },
    #[error("VISIBILITY_TIMEOUT_SECS ({visibility_secs} s) must be longer than BATCH_MAX_WAIT_MS ({batch_wait_ms} ms): messages would become visible again while their batch waits")]
    VisibilityShorterThanBatch { visibility_secs: u32, batch_wait_ms: u64 },
}

/// A parser of a count in `min..=max`, whose error names the range.
fn count(min: u64, max: u64) -> impl clap::builder::TypedValueParser<Value = usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..=max)
}

impl RunArgs {
    /// Reads and checks the masking key from MASK_KEY or MASK_KEY_FILE. Never prints it.
    pub fn load_mask_key(&self) -> Result<SecretString, ConfigError> {
        self.mask.load()
    }

    /// Checks what clap cannot: the queue URL's shape, and settings that cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_queue_url(&self.sqs.queue_url)?;
        if u64::from(self.visibility_timeout_secs) * 1000 <= self.batch_max_wait_ms {
            return Err(ConfigError::VisibilityShorterThanBatch {
                visibility_secs: self.visibility_timeout_secs,
                batch_wait_ms: self.batch_max_wait_ms,
            });
        }
        if self.pollers.is_none() && self.min_pollers > self.max_pollers {
            return Err(ConfigError::PollerRange { min: self.min_pollers, max: self.max_pollers });
        }
        Ok(())
    }

    /// How many pollers run: `POLLERS` pins the number, else `MIN_POLLERS..=MAX_POLLERS`.
    pub fn poller_range(&self) -> PollerRange {
        match self.pollers {
            Some(fixed) => PollerRange { min: fixed, max: fixed },
            None => PollerRange { min: self.min_pollers, max: self.max_pollers },
        }
    }

    /// The settings `run` takes, every rule checked (the mask key read, the queue URL's shape,
    /// settings that cannot work together); units attached.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        self.validate()?;
        let secs = Duration::from_secs;
        let positive = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Ok(Settings {
            sqs: self.sqs.access(),
            database: self.database.database_url.clone(),
            drain: self.drain,
            drain_timeout: secs(self.drain_timeout_secs),
            input_format: self.input_format,
            metrics_addr: self.metrics_addr,
            receive: ReceiveSettings {
                queue_url: self.sqs.queue_url.clone(),
                wait: secs(self.receive_wait_secs.into()),
                visibility_timeout: secs(self.visibility_timeout_secs.into()),
                max_backoff: secs(self.retry_max_backoff_secs),
            },
            pollers: self.poller_range(),
            dedup_ttl: secs(self.dedup_ttl_secs),
            dedup_capacity: NonZeroU64::new(self.dedup_capacity).unwrap_or(NonZeroU64::MIN),
            mask_key: self.load_mask_key()?,
            quarantine_copy_max_bytes: self.copy.quarantine_copy_max_bytes,
            mask_concurrency: positive(self.mask_concurrency),
            windows: WindowSettings {
                max_rows: self.batch_max_rows,
                max_wait: Duration::from_millis(self.batch_max_wait_ms),
                connections: self.sink_connections,
            },
            max_inflight_bytes: self.max_inflight_bytes,
            flush_timeout: secs(self.flush_timeout_secs),
            pii: self
                .pii_kms_key_id
                .clone()
                .map(|kms_key_id| PiiSettings { kms_key_id, key_rotation: secs(self.pii_key_rotation_secs) }),
            shutdown_grace: secs(self.shutdown_grace_secs),
            retry_max_backoff: secs(self.retry_max_backoff_secs),
        })
    }
}

/// Checks that a queue URL is an http(s) URL with a queue name as its last segment.
pub fn validate_queue_url(url: &str) -> Result<(), ConfigError> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(rest) if rest.trim_end_matches('/').contains('/') => Ok(()),
        _ => Err(ConfigError::QueueUrl(url.to_owned())),
    }
}

fn parse_database_url(url: &str) -> Result<crate::sink::Database, String> {
    url.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("loginflow").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_parse() {
        let cli = parse(&["run"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        let run = *run;
        assert_eq!(run.poller_range(), PollerRange { min: 1, max: 16 });
        assert_eq!(run.worker_threads, 1);
        assert_eq!(run.max_inflight_bytes, 64 << 20);
        assert!(run.validate().is_ok());
        assert_eq!(run.sqs.queue_name(), "login-queue");
        let settings = parse(&["run", "--mask-key", &"k".repeat(32)]).map(|cli| match cli.command {
            Command::Run(run) => run.settings().unwrap(),
            _ => unreachable!(),
        });
        assert_eq!(settings.unwrap().windows.max_wait, Duration::from_millis(20));
    }

    #[test]
    fn the_pipeline_future_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let Command::Run(args) = parse(&["run", "--mask-key", &"k".repeat(32)]).unwrap().command else {
            unreachable!()
        };
        assert_send(&crate::run(args.settings().unwrap(), std::future::pending()));
    }

    #[test]
    fn pollers_pins_the_range_and_a_range_upside_down_is_refused() {
        let range = |args: &[&str]| match parse(args).unwrap().command {
            Command::Run(run) => (run.poller_range(), run.validate().map_err(|e| e.to_string())),
            _ => unreachable!(),
        };
        assert_eq!(range(&["run", "--pollers", "4"]).0, PollerRange { min: 4, max: 4 });
        assert_eq!(range(&["run", "--max-pollers", "8"]).0, PollerRange { min: 1, max: 8 });
        let (_, checked) = range(&["run", "--min-pollers", "9", "--max-pollers", "8"]);
        assert!(checked.unwrap_err().contains("MIN_POLLERS (9) must not be more than MAX_POLLERS (8)"));
    }

    #[test]
    fn invalid_number_names_the_variable() {
        let err = parse(&["run", "--pollers", "lots"]).unwrap_err().to_string();
        assert!(err.contains("POLLERS"), "{err}");
        let err = parse(&["run", "--receive-wait-secs", "21"]).unwrap_err().to_string();
        assert!(err.contains("RECEIVE_WAIT_SECS") && err.contains("1..=20"), "{err}");
        let err = parse(&["run", "--batch-max-rows", "0"]).unwrap_err().to_string();
        assert!(err.contains("BATCH_MAX_ROWS"), "{err}");
    }

    #[test]
    fn sizes_have_upper_bounds_and_zero_wait_is_refused() {
        for (flag, variable, value) in [
            ("--batch-max-rows", "BATCH_MAX_ROWS", "10001"),
            ("--pollers", "POLLERS", "257"),
            ("--worker-threads", "WORKER_THREADS", "0"),
            ("--worker-threads", "WORKER_THREADS", "257"),
            ("--sink-connections", "SINK_CONNECTIONS", "65"),
            ("--mask-concurrency", "MASK_CONCURRENCY", "65"),
            ("--max-inflight-bytes", "MAX_INFLIGHT_BYTES", "1000"),
            ("--receive-wait-secs", "RECEIVE_WAIT_SECS", "0"),
        ] {
            let err = parse(&["run", flag, value]).unwrap_err().to_string();
            assert!(err.contains(variable), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn a_visibility_timeout_within_the_batch_window_is_refused() {
        let cli = parse(&["run", "--visibility-timeout-secs", "2", "--batch-max-wait-ms", "2000"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        let err = run.validate().unwrap_err().to_string();
        assert!(err.contains("VISIBILITY_TIMEOUT_SECS") && err.contains("BATCH_MAX_WAIT_MS"), "{err}");
    }

    #[test]
    fn bad_database_url_is_rejected_with_its_name() {
        let err = parse(&["run", "--database-url", "mysql://x"]).unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL") && err.contains("postgres://"), "{err}");
    }

    #[test]
    fn mask_key_rules() {
        let cli = parse(&["run"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        let mut run = *run;
        run.mask.mask_key = None;
        run.mask.mask_key_file = None;
        assert!(matches!(run.load_mask_key(), Err(ConfigError::MaskKeyMissing)));
        run.mask.mask_key = Some(SecretString::from("short-secret-value"));
        let err = run.load_mask_key().unwrap_err();
        assert!(err.to_string().contains("MASK_KEY is 18 bytes"), "{err}");
        assert!(!err.to_string().contains("short-secret-value"));
        run.mask.mask_key = Some(SecretString::from("k".repeat(32)));
        assert!(run.load_mask_key().is_ok());
    }

    #[test]
    fn mask_key_file_is_read_and_trimmed() {
        let path = std::env::temp_dir().join(format!("loginflow-key-{}", std::process::id()));
        std::fs::write(&path, format!("{}\n", "s".repeat(32))).unwrap();
        let cli = parse(&["run"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        let mut run = *run;
        run.mask.mask_key = None;
        run.mask.mask_key_file = Some(path.clone());
        assert_eq!(run.load_mask_key().unwrap().expose_secret().len(), 32);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn queue_url_shape() {
        assert!(validate_queue_url(DEFAULT_QUEUE_URL).is_ok());
        assert!(validate_queue_url("login-queue").is_err());
        assert!(validate_queue_url("http://localhost:4566").is_err());
    }
}
