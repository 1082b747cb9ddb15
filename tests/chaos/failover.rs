//! Failover: the primary dies mid-drain (`pg_ctl -m immediate stop`) and its streaming standby is
//! promoted; loginflow, given both hosts with `target_session_attrs=read-write`, carries on against
//! the new primary by itself. Nothing lost, nothing duplicated, nothing in the DLQ.
//!
//! The pair is private to this test (`scripts/services.sh pg-pair-up`), on ports of its own, and
//! torn down however the test ends. Its replication is synchronous, so every commit the primary
//! acknowledged is on the standby when it dies (see `pg_pair_up`).

use super::*;

/// Below the ephemeral range (32768–60999 here), so no client socket can hold the port when the server binds it.
const PRIMARY_PORT: u16 = 25442;
const STANDBY_PORT: u16 = 25443;
const PAIR_DIR: &str = "/var/tmp/loginflow-pg-pair-25442";
const SERVICES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");

/// A primary and its streaming standby; dropping it stops both and removes their directory.
struct Pair;

impl Pair {
    fn up() -> Pair {
        let pair = Pair; // built first, so a half-made pair is torn down too
        let (primary, standby) = (PRIMARY_PORT.to_string(), STANDBY_PORT.to_string());
        let status = std::process::Command::new("bash")
            .args([SERVICES, "pg-pair-up", PAIR_DIR, &primary, &standby])
            .status()
            .expect("services.sh runs");
        assert!(status.success(), "scripts/services.sh pg-pair-up failed");
        pair
    }

    /// Runs `scripts/services.sh COMMAND PAIR_DIR` without blocking the runtime (loginflow's
    /// logs are read on it meanwhile).
    async fn run(&self, command: &str) -> Duration {
        let started = Instant::now();
        let status = Command::new("bash").args([SERVICES, command, PAIR_DIR]).status().await.expect("services.sh runs");
        assert!(status.success(), "scripts/services.sh {command} failed");
        started.elapsed()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash").args([SERVICES, "pg-pair-down", PAIR_DIR]).status();
    }
}

#[tokio::test]
async fn primary_killed_mid_drain_and_standby_promoted_loses_and_duplicates_nothing() {
    let pair = Pair::up();
    let env = TestEnv::on_server(&format!("postgres://postgres@127.0.0.1:{PRIMARY_PORT}/postgres")).await;
    let (_, database) = env.database_url.rsplit_once('/').expect("database URL has a path");
    let failover_url = format!(
        "postgres://postgres@127.0.0.1:{PRIMARY_PORT},127.0.0.1:{STANDBY_PORT}/{database}?target_session_attrs=read-write&connect_timeout=2"
    );
    // The same database and queue, read on the standby: the checks cannot use the dead primary.
    let standby = TestEnv {
        database_url: format!("postgres://postgres@127.0.0.1:{STANDBY_PORT}/{database}"),
        queue_url: env.queue_url.clone(),
        endpoint: env.endpoint.clone(),
        sqs: env.sqs.clone(),
    };

    let bodies = synthetic_bodies(20_000, 117);
    let sent = env.publish_with_ids(&bodies).await;
    // Settings are applied after `binary_env`, so this DATABASE_URL replaces the single-host one.
    let settings = [("DATABASE_URL", failover_url), ("VISIBILITY_TIMEOUT_SECS", "10".to_owned())];
    let mut process = Loginflow::spawn(&env, &["--drain"], &settings);
    wait_for_rows(&env, 1_000).await;

    pair.run("pg-pair-stop-primary").await;
    assert_eq!(row_count(&env).await, -1, "the primary is down");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(process.is_running(), "loginflow kept running without a primary");
    // What the standby holds (replayed by now) is what the primary had committed.
    let rows_at_kill = row_count(&standby).await;
    assert!(rows_at_kill >= 1_000, "the standby has the primary's rows: {rows_at_kill}");

    // Time to resume: from the promote command until loginflow's rows grow on the new primary.
    let promote = pair.run("pg-pair-promote").await;
    let resume = promote + time_to_progress(&standby, rows_at_kill).await;

    let (ok, summary, logs) = process.finish(Duration::from_secs(300)).await;
    assert!(ok, "the drain through the failover failed: {logs}");
    let dead = standby.take_dead_letters().await;
    assert!(dead.is_empty(), "{} messages reached the DLQ: {dead:?}", dead.len());
    let (lost, duplicated) = standby.assert_each_once(&sent, &dead).await;
    assert_no_pii(&standby, &bodies, &logs).await;
    println!(
        "figures: failover sent={} rows_at_kill={rows_at_kill} promote_secs={:.2} resume_secs={:.2} written={} quarantined={} duplicates_dropped={} lost={lost} duplicated={duplicated} dead_lettered={}",
        sent.len(),
        promote.as_secs_f64(),
        resume.as_secs_f64(),
        summary["written"],
        summary["quarantined"],
        summary["duplicates"],
        dead.len()
    );
}
