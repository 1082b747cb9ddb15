//! TLS to PostgreSQL, against the TLS-only cluster `scripts/test.sh` starts (a throw-away
//! CA, `hostssl` only): libpq's `sslmode`/`sslrootcert` semantics, and errors that say
//! which step of connecting failed.

use std::time::Duration;

use loginflow::sink::Sink;

use crate::helpers::*;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample_logins.json");

fn tls_server() -> String {
    std::env::var("TLS_DATABASE_URL").expect("TLS_DATABASE_URL is not set: run through scripts/test.sh")
}

fn ca(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run through scripts/test.sh"))
}

/// `url` with its TLS parameters replaced by `params`.
fn with_params(url: &str, params: &str) -> String {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    format!("{base}?{params}")
}

/// A fresh database on the TLS-only server, reached with `verify-full` and the right CA.
async fn verified_env() -> TestEnv {
    let admin = with_params(&tls_server(), &format!("sslmode=verify-full&sslrootcert={}", ca("TLS_CA_FILE")));
    TestEnv::on_server(&admin).await
}

async fn login_rows(env: &TestEnv) -> i64 {
    let db = env.db().await;
    let table = db.query_one("SELECT to_regclass('user_logins') IS NOT NULL", &[]).await.unwrap();
    if !table.get::<_, bool>(0) {
        return 0;
    }
    db.query_one("SELECT count(*) FROM user_logins", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn verify_full_with_the_right_ca_drains_the_sample_over_tls() {
    let env = verified_env().await;
    let seeded = run_binary(&env, &["seed", "--file", SAMPLE], &[]).await;
    assert!(seeded.status.success(), "seed: {}", String::from_utf8_lossy(&seeded.stderr));

    let summary = env.drain(&[]).await;
    assert_eq!((summary.written, summary.quarantined), (99, 1));
    assert_eq!(login_rows(&env).await, 99);
    let db = env.db().await;
    let encrypted: bool =
        db.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(encrypted, "the test's own connection went over TLS");
    env.assert_queue_empty().await;

    // /readyz's probe uses the same settings.
    let sink = Sink::new(env.database_url.parse().unwrap(), 1);
    assert!(sink.ping(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_untrusted_ca_is_refused_with_a_clear_error_and_nothing_is_written() {
    let env = verified_env().await;
    let sent = env.publish_with_ids(&synthetic_bodies(20, 7)).await;
    let wrong = with_params(&env.database_url, &format!("sslmode=verify-full&sslrootcert={}", ca("TLS_OTHER_CA_FILE")));

    // `run` stops at startup, naming the step that failed (waiting would not change it).
    let run = loginflow::run(env.run_args(&["--database-url", &wrong]).settings().unwrap(), std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(30), run).await.expect("startup ends").unwrap_err();
    let message = loginflow::errors::error_chain(&err);
    assert!(message.contains("DATABASE_URL") && message.contains("certificate verification failed"), "{message}");

    // `migrate` too, with a non-zero exit.
    let migrated = run_binary(&env, &["migrate"], &[("DATABASE_URL", wrong.as_str())]).await;
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert!(!migrated.status.success() && stderr.contains("certificate verification failed"), "{stderr}");

    assert_eq!(login_rows(&env).await, 0, "nothing reached the database");
    let sink = Sink::new(wrong.parse().unwrap(), 1);
    assert!(!sink.ping(Duration::from_secs(5)).await, "/readyz reports the untrusted server as unreachable");

    // The messages are still there for a run with the right settings.
    env.drain(&[]).await;
    env.assert_exactly_once(&sent).await;
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let env = verified_env().await;
    // The certificate names localhost and 127.0.0.1; reach the same address under another name.
    let base = env.database_url.split_once('?').unwrap().0.replace("127.0.0.1", "db.invalid");
    let root = ca("TLS_CA_FILE");

    let full = format!("{base}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={root}");
    let err = Sink::new(full.parse().unwrap(), 1).migrate().await.unwrap_err().to_string();
    assert!(err.contains("certificate verification failed") && err.contains("not valid for name"), "{err}");

    let ca_only = format!("{base}?hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={root}");
    Sink::new(ca_only.parse().unwrap(), 1).migrate().await.expect("verify-ca accepts another name");
    let wrong_ca = format!("{base}?hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={}", ca("TLS_OTHER_CA_FILE"));
    let err = Sink::new(wrong_ca.parse().unwrap(), 1).migrate().await.unwrap_err().to_string();
    assert!(err.contains("certificate verification failed") && err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn require_encrypts_without_verifying_and_disable_is_refused_by_a_tls_only_server() {
    let env = verified_env().await;
    for mode in ["require", "prefer"] {
        let url = with_params(&env.database_url, &format!("sslmode={mode}"));
        Sink::new(url.parse().unwrap(), 1).migrate().await.unwrap_or_else(|err| panic!("{mode}: {err}"));
    }
    let plain = with_params(&env.database_url, "sslmode=disable");
    let err = Sink::new(plain.parse().unwrap(), 1).migrate().await.unwrap_err().to_string();
    assert!(err.contains("authentication failed") && err.contains("no encryption"), "{err}");

    let closed_port = "postgres://postgres@127.0.0.1:9/postgres?sslmode=require&connect_timeout=2";
    let err = Sink::new(closed_port.parse().unwrap(), 1).migrate().await.unwrap_err().to_string();
    assert!(err.contains("TCP connection failed"), "{err}");
}

#[tokio::test]
async fn require_against_a_server_without_tls_says_so() {
    let env = TestEnv::new().await; // the plain cluster: ssl = off
    let url = with_params(&env.database_url, "sslmode=require");
    let err = Sink::new(url.parse().unwrap(), 1).migrate().await.unwrap_err().to_string();
    assert!(err.contains("TLS handshake failed"), "{err}");
    // prefer falls back to plain text there, as libpq does.
    let url = with_params(&env.database_url, "sslmode=prefer");
    Sink::new(url.parse().unwrap(), 1).migrate().await.expect("prefer falls back");
}
