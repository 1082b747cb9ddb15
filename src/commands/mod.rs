//! The batch commands beside `run`: each one job over the queue or the tables.
//!
//! - [`seed`]: demo and load-test messages into a queue
//! - [`redrive`]: messages from the dead-letter queue back to the source queue
//! - [`reveal`]: open sealed values (and `forget` a user), audited
//! - [`remask`]: rewrite masks under a new key from the sealed values
//! - [`replay`]: quarantined messages through the transform again

pub mod redrive;
pub mod remask;
pub mod replay;
pub mod reveal;
pub mod seed;

/// Who is asking: the operating-system user and the database role.
async fn who(tx: &impl tokio_postgres::GenericClient) -> Result<String, tokio_postgres::Error> {
    let role: String = tx.query_one("SELECT session_user::text", &[]).await?.get(0);
    let os_user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    Ok(format!("{os_user} (database role {role})"))
}

/// Appends an access-log row: who, why, what action, which messages.
pub(crate) async fn audit(
    tx: &impl tokio_postgres::GenericClient,
    action: &str,
    reason: &str,
    message_ids: &[String],
) -> Result<(), tokio_postgres::Error> {
    let who = who(tx).await?;
    tx.execute(
        "INSERT INTO pii_access_log (who, why, action, message_ids) VALUES ($1, $2, $3, $4)",
        &[&who, &reason, &action, &message_ids],
    )
    .await?;
    Ok(())
}
