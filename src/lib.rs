//! loginflow: a streaming ETL from SQS to PostgreSQL.
//!
//! The modules follow the pipeline, in order:
//!
//! - [`source`]: long-polling SQS receivers, the registry of held messages, visibility extension
//! - [`decode`]: JSON body → [`decode::ValidLogin`] or a quarantine [`decode::Reason`]
//! - [`dedup`]: TTL cache of committed messages
//! - [`mask`]: keyed HMAC-SHA256 of `ip` and `device_id` → [`mask::MaskedLogin`]
//! - [`sink`]: one transaction per window of rows, into `user_logins` and `user_logins_quarantine`
//! - [`ack`]: delete from the queue after commit
//! - [`pipeline`]: the wiring, windowing, drain and shutdown; [`run`] is the entry point
//!
//! Around them: [`config`] (flags and environment), [`schema`] (migrations), [`sqs`] (client),
//! [`metrics`] and [`http`] (observability), [`seed`] (demo and load-test data), [`retry`].

pub mod ack;
pub mod config;
pub mod decode;
pub mod dedup;
pub mod http;
pub mod mask;
pub mod metrics;
pub mod pipeline;
pub mod redrive;
pub mod retry;
pub mod schema;
pub mod seed;
pub mod shapes;
pub mod sink;
pub mod source;
pub mod sqs;
pub mod vault;

pub use pipeline::{run, RunError, RunSummary};

/// An error and each of its causes, `outer: cause: root`, for logs. Errors of loginflow and
/// its clients never carry message bodies, so this prints no raw value.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("write failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause() {
        let err = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
        assert_eq!(super::error_chain(&err), "write failed: connection refused");
    }
}
