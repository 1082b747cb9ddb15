//! What runs beside the stages: the operations endpoint, the schema, the PII vault, and the
//! source's background tasks (visibility extension, the queue watcher). Each is started by the
//! module that owns it; this only starts them in order and stops them at the end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{RunError, Settings};
use crate::sink::Sink;
use crate::source::{self, InFlight};
use crate::vault::Vault;
use crate::{http, metrics, sqs};

/// How long `run` waits for its background tasks at the end.
const TASKS_WAIT: Duration = Duration::from_secs(2);

/// The services the stages use, and the background tasks started with them.
pub(super) struct Started {
    pub sqs: aws_sdk_sqs::Client,
    pub sink: Sink,
    pub vault: Option<Arc<Vault>>,
    /// What the SQS client has sent, by action.
    pub requests: Arc<sqs::Requests>,
    /// Messages received and not yet deleted (and how the last receive went).
    pub in_flight: Arc<InFlight>,
    background: CancellationToken,
    tracker: TaskTracker,
}

impl Started {
    /// Serves the operations endpoint, migrates the schema and opens the vault; `None` when
    /// `shutdown` came first (nothing was received, so only the background tasks stop).
    pub async fn start(
        settings: &Settings,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Started>, RunError> {
        let prometheus = metrics::install();
        let requests = Arc::new(sqs::Requests::default());
        let sqs = sqs::counting_client(&settings.sqs, requests.clone()).await;
        let sink =
            Sink::with_flush_timeout(settings.database.clone(), settings.windows.connections, settings.flush_timeout)
                .with_vault_tables(settings.pii.is_some());
        let started = Started {
            sqs,
            sink,
            vault: None,
            requests,
            in_flight: Arc::default(),
            background: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };

        let probes = http::Probes {
            sink: started.sink.clone(),
            sqs: started.sqs.clone(),
            queue_url: settings.receive.queue_url.clone(),
            in_flight: started.in_flight.clone(),
        };
        let serving = http::start(settings.metrics_addr, prometheus, probes, started.background.clone())
            .await
            .map_err(|source| RunError::MetricsAddr { addr: settings.metrics_addr, source })?;
        started.tracker.spawn(serving);

        let migrated = tokio::select! {
            migrated = started.sink.migrate_with_retry(settings.retry_max_backoff) => migrated,
            () = shutdown.as_mut() => return started.stopped_before_start("schema").await,
        };
        migrated.map_err(RunError::Database)?;

        let Some(pii) = &settings.pii else {
            tracing::info!("PII vault off (PII_KMS_KEY_ID unset): raw values are not kept anywhere");
            return Ok(Some(started));
        };
        let kms = aws_sdk_kms::Client::new(&sqs::sdk_config(&settings.sqs).await);
        // KMS may stall (each SDK attempt waits up to its own timeout): shutdown does not wait for it.
        let opened = tokio::select! {
            opened = Vault::open(kms, pii.kms_key_id.clone(), started.sink.pool()) => opened,
            () = shutdown.as_mut() => return started.stopped_before_start("PII vault").await,
        };
        let vault = Arc::new(opened.map_err(RunError::Vault)?);
        tracing::info!(kms_key_id = %pii.kms_key_id, rotation = ?pii.key_rotation,
                       "PII vault on: raw ip, device_id and quarantined bodies are sealed into user_logins_pii");
        let rotation =
            vault.clone().rotate_every(pii.key_rotation, started.sink.pool().clone(), started.background.clone());
        started.tracker.spawn(rotation);
        Ok(Some(Started { vault: Some(vault), ..started }))
    }

    /// Starts the source's background tasks: visibility extension of what `in_flight` holds,
    /// and the queue watcher (the depth gauge; with `--drain`, stopping the source when done).
    pub fn watch_queue(&self, settings: &Settings, stop_source: &CancellationToken) {
        let in_flight = &self.in_flight;
        let queue_url = settings.receive.queue_url.clone();
        self.tracker.spawn(source::extend_visibility(
            self.sqs.clone(),
            queue_url.clone(),
            in_flight.clone(),
            settings.receive.visibility_timeout,
            self.background.clone(),
        ));
        let drain = settings.drain.then(|| stop_source.clone());
        self.tracker.spawn(source::drain::watch_queue(
            self.sqs.clone(),
            queue_url,
            in_flight.clone(),
            drain,
            self.background.clone(),
        ));
    }

    /// Stops the background tasks, waiting for them at most [`TASKS_WAIT`].
    pub async fn stop(&self) {
        self.background.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(TASKS_WAIT, self.tracker.wait()).await;
    }

    async fn stopped_before_start(self, step: &str) -> Result<Option<Started>, RunError> {
        tracing::info!(step, "shut down before the pipeline started; nothing was received");
        self.stop().await;
        Ok(None)
    }
}
