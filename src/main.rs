//! The `loginflow` binary: parses configuration and calls the library.

use anyhow::Context;
use clap::Parser;
use loginflow::commands::reveal::{self, Lookup};
use loginflow::commands::{redrive, remask, replay, seed};
use loginflow::config::{Cli, Command, LogFormat, QuarantineCommand, VaultJobArgs};
use loginflow::masker::Masker;
use loginflow::vault::KeyRing;
use loginflow::{sink::Sink, sqs};
use tracing::Level;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::prelude::*;

// Messages are allocated by the poller tasks and freed by the sink tasks on other threads;
// mimalloc handles that cross-thread pattern far better than glibc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Dependencies that print request data at debug level (tokio-postgres prints query
/// parameters, the AWS SDK prints bodies): capped at INFO whatever RUST_LOG says.
const CHATTY_DEPENDENCIES: [&str; 5] = ["tokio_postgres", "aws_smithy", "aws_sdk", "hyper", "h2"];

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let no_raw_data = filter_fn(|meta| {
        *meta.level() <= Level::INFO || !CHATTY_DEPENDENCIES.iter().any(|dep| meta.target().starts_with(dep))
    });
    let registry = tracing_subscriber::registry().with(filter).with(no_raw_data);
    match format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A panic's message may quote a body (and its PII): report where it happened, never what it said.
    std::panic::set_hook(Box::new(|info| {
        let place = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(%place, "panicked");
    }));
    // The command runs as a task on WORKER_THREADS workers (default 1), beside its pollers,
    // database connections and SDK connections, so a message crosses no thread on its way:
    // hand-offs between threads were the main cost per message beyond the SDK's (BENCHMARKS.md).
    // The main thread only waits for that task.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Run(args) = &cli.command {
        runtime.worker_threads(args.worker_threads);
    }
    let runtime = runtime.enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match tokio::spawn(command(cli.command)).await {
            Ok(result) => result,
            // Its message may quote external data: only that it panicked (the hook printed where).
            Err(err) => {
                anyhow::bail!("the command's task {}", if err.is_panic() { "panicked" } else { "was cancelled" })
            }
        }
    })
}

async fn command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => match loginflow::run(args.settings()?, loginflow::pipeline::shutdown_signal()).await {
            Ok(summary) => println!("{}", serde_json::to_string_pretty(&summary_json(&summary))?),
            Err(err) => {
                if let loginflow::RunError::DrainTimeout { summary, .. } = &err {
                    println!("{}", serde_json::to_string_pretty(&summary_json(summary))?);
                }
                return Err(err.into());
            }
        },
        Command::Migrate(args) => {
            let sink = Sink::new(args.database_url, 1);
            sink.migrate().await.context("migration failed")?;
            let client = sink.client().await.context("cannot use the database in DATABASE_URL")?;
            loginflow::schema::create_lookup_indexes(&client)
                .await
                .context("building the vault's lookup index failed")?;
            println!("schema is up to date");
        }
        Command::Seed(args) => {
            loginflow::config::validate_queue_url(&args.sqs.queue_url)?;
            let client = sqs::client(&args.sqs.access()).await;
            let queue_url = seed::ensure_queue(&client, args.sqs.queue_name(), args.max_receive_count).await?;
            let bodies = match (&args.file, args.count) {
                (Some(path), _) => seed::bodies_from_file(path)?,
                (None, Some(count)) => seed::synthetic(count, args.rng_seed).map(|v| v.to_string()).collect(),
                (None, None) => anyhow::bail!("seed needs --file PATH or --count N"),
            };
            let sent = match args.rate {
                Some(per_second) => seed::publish_paced(&client, &queue_url, bodies, per_second).await?,
                None => seed::publish(&client, &queue_url, bodies).await?,
            };
            println!("published {sent} messages to {queue_url}");
        }
        Command::Redrive(args) => {
            loginflow::config::validate_queue_url(&args.sqs.queue_url)?;
            let client = sqs::client(&args.sqs.access()).await;
            let progress = |line: &str| eprintln!("redrive: {line}");
            let report =
                redrive::redrive(&client, &args.sqs.queue_url, args.dlq_url.as_deref(), args.method, progress).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if report.failed > 0 {
                anyhow::bail!("{} messages could not be moved; they are still in the dead-letter queue", report.failed);
            }
        }
        Command::Reveal(args) => {
            let lookup = match (args.message_id, args.user_id, args.masked_ip, args.masked_device_id) {
                (ids, None, None, None) if !ids.is_empty() => Lookup::MessageIds(ids),
                (_, Some(user), None, None) => Lookup::UserId(user),
                (_, None, Some(mask), None) => Lookup::MaskedIp(mask),
                (_, None, None, Some(mask)) => Lookup::MaskedDeviceId(mask),
                _ => anyhow::bail!("give exactly one of --message-id, --user-id, --masked-ip, --masked-device-id"),
            };
            let mut keys = KeyRing::new(aws_sdk_kms::Client::new(&sqs::sdk_config(&args.aws.access()).await));
            let mut client = vault_connection(&args.database).await?;
            let revealed = reveal::reveal(&mut client, &mut keys, &lookup, &args.reason).await?;
            for row in &revealed {
                println!("{}", serde_json::to_string(row)?);
            }
            eprintln!("revealed {} rows; the access is recorded in pii_access_log", revealed.len());
        }
        Command::Forget(args) => {
            let masker = Masker::new(&args.mask.load()?);
            let mut client = vault_connection(&args.database).await?;
            let erased = reveal::forget(&mut client, &masker, &args.user_id, &args.reason).await?;
            println!(
                "{}",
                serde_json::json!({ "user_id": args.user_id, "erased": erased.len(), "message_ids": erased })
            );
        }
        Command::Remask(args) => {
            let (sink, mut keys, masker) = vault_job(&args.job).await?;
            let report = remask::remask(&sink, &mut keys, &masker, args.job.batch_rows, &args.why).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Quarantine(QuarantineCommand::Replay(args)) => {
            let (sink, mut keys, masker) = vault_job(&args.job).await?;
            let reason = args.reason.as_deref();
            let report =
                replay::replay(&sink, &mut keys, &masker, reason, args.input_format, args.job.batch_rows, &args.why)
                    .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Generate(args) => {
            let records: Vec<serde_json::Value> = seed::synthetic(args.count, args.rng_seed).collect();
            println!("{}", serde_json::to_string_pretty(&records)?);
        }
    }
    Ok(())
}

/// A connection for the vault's commands, with the schema in place.
async fn vault_connection(args: &loginflow::config::DatabaseArgs) -> anyhow::Result<tokio_postgres::Client> {
    let database = &args.database_url;
    let (mut client, connection) =
        database.config.connect(database.tls.clone()).await.context("cannot connect to DATABASE_URL")?;
    tokio::spawn(connection);
    let deadline = format!("SET statement_timeout = {}", VAULT_JOB_TIMEOUT.as_millis());
    client.batch_execute(&deadline).await.context("cannot set statement_timeout")?;
    loginflow::schema::migrate(&mut client).await.context("migration failed")?;
    Ok(client)
}

/// Deadline of each statement and batch of the vault commands (`reveal`, `forget`, `remask`, `quarantine replay`).
const VAULT_JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// What `remask` and `quarantine replay` work with: the database (schema in place), KMS, the mask key.
async fn vault_job(args: &VaultJobArgs) -> anyhow::Result<(Sink, KeyRing, Masker)> {
    let masker = Masker::new(&args.mask.load()?).with_copy_max_bytes(args.copy.quarantine_copy_max_bytes);
    // Statements of a batch job may scan a large table: a longer deadline than the pipeline's flush.
    let sink = Sink::with_flush_timeout(args.database.database_url.clone(), 1, VAULT_JOB_TIMEOUT);
    sink.migrate().await.context("cannot use the database in DATABASE_URL")?;
    let keys = KeyRing::new(aws_sdk_kms::Client::new(&sqs::sdk_config(&args.aws.access()).await));
    Ok((sink, keys, masker))
}

fn summary_json(summary: &loginflow::RunSummary) -> serde_json::Value {
    serde_json::json!({
        "received": summary.received,
        "written": summary.written,
        "quarantined": summary.quarantined,
        "quarantined_by_reason": summary.quarantined_by_reason.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "duplicates": summary.duplicates,
        "deleted": summary.deleted,
        "delete_failures": summary.delete_failures,
        "released": summary.released,
        "abandoned": summary.abandoned,
        "sqs_requests": summary.sqs_requests.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    })
}
