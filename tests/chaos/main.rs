//! Fault injection against real PostgreSQL and LocalStack, one test at a time (scripts/chaos.sh).
//! Each test prints a `figures:` line that RELIABILITY.md records.

mod failover;
#[path = "../integration/helpers.rs"]
mod helpers;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpers::*;
use rand::Rng;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::{JoinHandle, JoinSet};

/// A `loginflow run` process with its logs (debug level) collected for the PII scan.
struct Loginflow {
    child: Child,
    logs: Arc<Mutex<String>>,
    stderr_reader: JoinHandle<()>,
}

impl Loginflow {
    fn spawn(env: &TestEnv, args: &[&str], settings: &[(&str, String)]) -> Loginflow {
        // CHAOS_WRAPPER runs loginflow under a profiler (e.g. `heaptrack`), for investigations.
        let mut command = match std::env::var("CHAOS_WRAPPER") {
            Ok(wrapper) => {
                let mut command = Command::new(wrapper);
                command.arg(env!("CARGO_BIN_EXE_loginflow"));
                command
            }
            Err(_) => Command::new(env!("CARGO_BIN_EXE_loginflow")),
        };
        let mut child = command
            .arg("run")
            .args(args)
            .envs(env.binary_env())
            .env("RUST_LOG", "debug")
            .env("RETRY_MAX_BACKOFF_SECS", "2")
            .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("loginflow starts");
        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        let stderr_reader = tokio::spawn(async move {
            let mut buffer = Vec::new();
            stderr.read_to_end(&mut buffer).await.ok();
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer));
        });
        Loginflow { child, logs, stderr_reader }
    }

    fn pid(&self) -> String {
        self.child.id().expect("running").to_string()
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// SIGKILL, then the logs written so far.
    async fn kill9(mut self) -> String {
        self.child.kill().await.expect("kill -9");
        self.stderr_reader.await.ok();
        let logs = self.logs.lock().unwrap().clone();
        logs
    }

    /// Waits for exit; returns (success, summary JSON, logs).
    async fn finish(mut self, limit: Duration) -> (bool, Value, String) {
        let status = tokio::time::timeout(limit, self.child.wait()).await.expect("exited in time").unwrap();
        let mut stdout = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut stdout).await.unwrap();
        self.stderr_reader.await.ok();
        let summary = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        let logs = self.logs.lock().unwrap().clone();
        (status.success(), summary, logs)
    }
}

/// Raw `ip` and `device_id` values of bodies, for the leak scans.
fn pii_values(bodies: &[String]) -> HashSet<String> {
    bodies
        .iter()
        .filter_map(|b| serde_json::from_str::<Value>(b).ok())
        .flat_map(|v| ["ip", "device_id"].map(|f| v[f].as_str().map(str::to_owned)))
        .flatten()
        .collect()
}

/// Asserts no raw PII value appears as a token of the logs or the tables.
async fn assert_no_pii(env: &TestEnv, bodies: &[String], logs: &str) {
    let pii = pii_values(bodies);
    let tables = dump_tables(&env.db().await).await;
    for (what, text) in [("logs", logs), ("database", tables.as_str())] {
        let leaked: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | '-' | ':')))
            .filter(|token| pii.contains(*token))
            .take(3)
            .collect();
        assert!(leaked.is_empty(), "raw PII in the {what}: {leaked:?}");
    }
    assert!(!logs.is_empty(), "logs were collected");
}

async fn row_count(env: &TestEnv) -> i64 {
    match tokio_postgres::connect(&env.database_url, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            client.query_one("SELECT count(*) FROM user_logins", &[]).await.map(|r| r.get(0)).unwrap_or(-1)
        }
        Err(_) => -1,
    }
}

async fn wait_for_rows(env: &TestEnv, at_least: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while row_count(env).await < at_least {
        assert!(Instant::now() < deadline, "fewer than {at_least} rows after 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Time until the row count grows past `from`.
async fn time_to_progress(env: &TestEnv, from: i64) -> Duration {
    let started = Instant::now();
    while row_count(env).await <= from {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

fn services(command: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let status = std::process::Command::new("bash").args([script, command]).status().expect("services.sh runs");
    assert!(status.success(), "scripts/services.sh {command} failed");
}

const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn kill_9_at_random_points_loses_and_duplicates_nothing() {
    let env = TestEnv::new().await;
    let bodies = synthetic_bodies(40_000, 101);
    let sent = env.publish_with_ids(&bodies).await;
    let settings = [("VISIBILITY_TIMEOUT_SECS", "3".to_owned()), ("BATCH_MAX_ROWS", "500".to_owned())];
    let mut logs = String::new();
    let mut rows_at_kill = Vec::new();
    for _ in 0..10 {
        let process = Loginflow::spawn(&env, &[], &settings);
        let lifetime = rand::rng().random_range(200..1_200);
        tokio::time::sleep(Duration::from_millis(lifetime)).await;
        logs.push_str(&process.kill9().await);
        rows_at_kill.push(row_count(&env).await);
    }
    let (ok, summary, last_logs) =
        Loginflow::spawn(&env, &["--drain"], &settings).finish(Duration::from_secs(300)).await;
    logs.push_str(&last_logs);
    assert!(ok, "final drain failed: {last_logs}");
    let (lost, duplicated) = env.assert_exactly_once(&sent).await;
    assert!(rows_at_kill.iter().any(|n| *n < 39_600), "every kill came after the work was done: {rows_at_kill:?}");
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: crash sent={} kills=10 rows_at_each_kill={rows_at_kill:?} final_run_written={} lost={lost} duplicated={duplicated}",
        sent.len(),
        summary["written"]
    );
}

/// What an outage test measured.
struct OutageFigures {
    sent: usize,
    rows_before_return: i64,
    recovery: Duration,
    summary: Value,
    lost: usize,
    duplicated: usize,
}

/// Drains 6 000 messages through an outage of [`OUTAGE`]: `take_down` mid-run, `bring_back` after;
/// loginflow must stay up, resume by itself, and store every message exactly once.
async fn drain_through_outage(
    env: &TestEnv,
    seed: u64,
    settings: &[(&str, String)],
    take_down: impl AsyncFnOnce(),
    bring_back: impl AsyncFnOnce(),
) -> OutageFigures {
    let bodies = synthetic_bodies(6_000, seed);
    let sent = env.publish_with_ids(&bodies).await;
    let mut settings = settings.to_vec();
    settings.extend([("VISIBILITY_TIMEOUT_SECS", "10".to_owned()), ("BATCH_MAX_ROWS", "200".to_owned())]);
    let mut process = Loginflow::spawn(env, &["--drain"], &settings);
    wait_for_rows(env, 300).await;

    take_down().await;
    tokio::time::sleep(OUTAGE).await;
    assert!(process.is_running(), "loginflow kept running through the outage");
    bring_back().await;
    let rows_before_return = row_count(env).await;
    let recovery = time_to_progress(env, rows_before_return).await;

    let (ok, summary, logs) = process.finish(Duration::from_secs(300)).await;
    assert!(ok, "drain after the outage failed");
    let (lost, duplicated) = env.assert_exactly_once(&sent).await;
    assert_no_pii(env, &bodies, &logs).await;
    OutageFigures { sent: sent.len(), rows_before_return, recovery, summary, lost, duplicated }
}

#[tokio::test]
async fn postgres_stopped_for_30_seconds_mid_run_recovers_by_itself() {
    let env = TestEnv::new().await;
    let take_down = async || {
        services("postgres-stop");
        assert_eq!(row_count(&env).await, -1, "PostgreSQL is down");
    };
    let f = drain_through_outage(&env, 102, &[], take_down, async || services("postgres-start")).await;
    println!(
        "figures: postgres_outage sent={} outage_secs={} rows_before_restart={} recovery_secs={:.1} written={} quarantined={} duplicates_dropped={} lost={} duplicated={}",
        f.sent,
        OUTAGE.as_secs(),
        f.rows_before_return,
        f.recovery.as_secs_f64(),
        f.summary["written"],
        f.summary["quarantined"],
        f.summary["duplicates"],
        f.lost,
        f.duplicated
    );
}

/// A TCP proxy to the SQS emulator that can disappear (connections dropped, then refused).
struct Proxy {
    port: u16,
    upstream: String,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy { port, upstream: upstream.to_owned(), accept: Mutex::new(None) };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the accept task drops them all.
            let mut connections = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    fn down(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
    }

    async fn up(&self) {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.serve(listener);
    }
}

#[tokio::test]
async fn sqs_endpoint_gone_for_30_seconds_mid_run_recovers_by_itself() {
    let env = TestEnv::new().await;
    let proxy = Proxy::start(env.endpoint.trim_start_matches("http://")).await;
    let through_proxy = [("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", proxy.port))];
    let f = drain_through_outage(&env, 103, &through_proxy, async || proxy.down(), async || proxy.up().await).await;
    println!(
        "figures: sqs_outage sent={} outage_secs={} rows_before_return={} recovery_secs={:.1} written={} duplicates_dropped={} delete_failures={} lost={} duplicated={}",
        f.sent,
        OUTAGE.as_secs(),
        f.rows_before_return,
        f.recovery.as_secs_f64(),
        f.summary["written"],
        f.summary["duplicates"],
        f.summary["delete_failures"],
        f.lost,
        f.duplicated
    );
}

#[tokio::test]
async fn three_replicas_draining_one_queue_store_each_message_once() {
    let env = TestEnv::new().await;
    let bodies = synthetic_bodies(6_000, 104);
    let sent = env.publish_with_ids(&bodies).await;
    let replicas: Vec<Loginflow> = (0..3).map(|_| Loginflow::spawn(&env, &["--drain"], &[])).collect();
    let mut written = Vec::new();
    let mut logs = String::new();
    for replica in replicas {
        let (ok, summary, replica_logs) = replica.finish(Duration::from_secs(300)).await;
        assert!(ok);
        written.push(summary["written"].as_u64().unwrap());
        logs.push_str(&replica_logs);
    }
    let (lost, duplicated) = env.assert_exactly_once(&sent).await;
    assert_eq!(written.iter().sum::<u64>(), 5_940);
    assert!(written.iter().all(|w| *w > 0), "every replica took a share: {written:?}");
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: replicas sent={} written_per_replica={written:?} lost={lost} duplicated={duplicated}",
        sent.len()
    );
}

/// What one replica of the autoscaled drain did, for RELIABILITY.md.
struct ReplicaFigures {
    name: &'static str,
    ended: &'static str,
    summary: Value,
}

#[tokio::test]
async fn replicas_joining_and_leaving_mid_drain_as_an_autoscaler_would_store_each_message_once() {
    let env = TestEnv::new().await;
    let bodies = synthetic_bodies(20_000, 120);
    let sent = env.publish_with_ids(&bodies).await;
    // Adaptive pollers (the defaults), a 10 s grace as a pod's terminationGracePeriod allows.
    let settings = [("SHUTDOWN_GRACE_SECS", "10".to_owned())];
    let spawn = || Loginflow::spawn(&env, &["--drain"], &settings);
    let started = Instant::now();
    let mut running: Vec<(&'static str, Loginflow)> = vec![("r1", spawn()), ("r2", spawn())];
    let mut figures = Vec::new();
    let mut logs = String::new();
    // Scale out, in, out, in: each step once the drain has made progress, as queue depth would drive it.
    for (step, rows) in [("out", 3_000), ("in", 7_000), ("out", 11_000), ("in", 14_000)] {
        wait_for_rows(&env, rows).await;
        match step {
            "out" => {
                let name = if running.iter().any(|(n, _)| *n == "r3") { "r4" } else { "r3" };
                running.push((name, spawn()));
            }
            _ => {
                let (name, leaving) = running.remove(0);
                sigterm(&leaving);
                let (ok, summary, replica_logs) = leaving.finish(Duration::from_secs(30)).await;
                assert!(ok, "{name}: SIGTERM exits 0");
                logs.push_str(&replica_logs);
                figures.push(ReplicaFigures { name, ended: "SIGTERM", summary });
            }
        }
    }
    for (name, replica) in running {
        let (ok, summary, replica_logs) = replica.finish(Duration::from_secs(300)).await;
        assert!(ok, "{name}: --drain exits 0");
        logs.push_str(&replica_logs);
        figures.push(ReplicaFigures { name, ended: "drained", summary });
    }
    let elapsed = started.elapsed();
    let dead_letters = env.take_dead_letters().await;
    assert!(dead_letters.is_empty(), "nothing reaches the dead-letter queue: {dead_letters:?}");
    let (lost, duplicated) = env.assert_exactly_once(&sent).await;
    let total = |field: &str| figures.iter().map(|f| f.summary[field].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(total("written"), 19_800, "each valid message written by exactly one replica");
    assert_eq!(total("quarantined"), 200);
    assert_eq!(total("abandoned"), 0, "each leaving replica finished its work within the grace period");
    assert!(figures.iter().all(|f| f.summary["written"].as_u64().unwrap_or(0) > 0), "every replica took a share");
    assert_no_pii(&env, &bodies, &logs).await;
    let each: Vec<String> = figures
        .iter()
        .map(|f| {
            format!(
                "{}({}):written={},quarantined={},duplicates={},released={}",
                f.name,
                f.ended,
                f.summary["written"],
                f.summary["quarantined"],
                f.summary["duplicates"],
                f.summary["released"]
            )
        })
        .collect();
    println!(
        "figures: replicas_join_leave sent={} secs={:.1} lost={lost} duplicated={duplicated} dead_letters=0 {}",
        sent.len(),
        elapsed.as_secs_f64(),
        each.join(" ")
    );
}

#[tokio::test]
async fn a_flush_slower_than_the_visibility_timeout_causes_no_redelivery() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let bodies = synthetic_bodies(500, 105);
    let sent = env.publish_with_ids(&bodies).await;
    // Hold the table for 8 s: every flush waits far longer than the 2 s visibility timeout.
    let mut locker = env.db().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let process = Loginflow::spawn(&env, &["--drain"], &[("VISIBILITY_TIMEOUT_SECS", "2".to_owned())]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    lock.commit().await.unwrap();

    let (ok, summary, logs) = process.finish(Duration::from_secs(120)).await;
    assert!(ok);
    assert_eq!(summary["received"], 500, "no message was delivered twice");
    assert_eq!(summary["duplicates"], 0);
    let (lost, duplicated) = env.assert_exactly_once(&sent).await;
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: slow_flush sent={} visibility_secs=2 blocked_secs=8 received={} duplicates={} lost={lost} duplicated={duplicated}",
        sent.len(),
        summary["received"],
        summary["duplicates"]
    );
}

#[tokio::test]
async fn sigterm_during_a_busy_drain_exits_0_in_the_grace_period_and_loses_nothing() {
    let env = TestEnv::new().await;
    let bodies = synthetic_bodies(10_000, 106);
    let sent = env.publish_with_ids(&bodies).await;
    let grace = Duration::from_secs(10);
    let process = Loginflow::spawn(&env, &["--drain"], &[("SHUTDOWN_GRACE_SECS", grace.as_secs().to_string())]);
    wait_for_rows(&env, 1_000).await;
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &process.pid()]).status().unwrap().success());
    let (ok, first, mut logs) = process.finish(grace + Duration::from_secs(10)).await;
    let exit_after = signalled.elapsed();
    assert!(ok, "SIGTERM exits 0");
    assert!(exit_after < grace + Duration::from_secs(2), "took {exit_after:?}");
    assert_eq!(first["abandoned"], 0, "in-flight work finished within the grace period");
    let rows_after_sigterm = row_count(&env).await;
    assert!(rows_after_sigterm < 9_900, "the first run was stopped mid-drain");

    // What was not received stayed in the queue; a second run takes it.
    let (ok, second, more_logs) = Loginflow::spawn(&env, &["--drain"], &[]).finish(Duration::from_secs(300)).await;
    assert!(ok);
    logs.push_str(&more_logs);
    let (lost, duplicated) = env.assert_exactly_once(&sent).await;
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: sigterm sent={} exit_secs={:.2} grace_secs={} first_run_written={} second_run_written={} lost={lost} duplicated={duplicated}",
        sent.len(),
        exit_after.as_secs_f64(),
        grace.as_secs(),
        first["written"],
        second["written"]
    );
}

/// Sends SIGTERM to a running loginflow.
fn sigterm(process: &Loginflow) {
    assert!(std::process::Command::new("kill").args(["-TERM", &process.pid()]).status().unwrap().success());
}

/// The `user_id`s of some valid bodies, to aim a database fault at.
fn victims(bodies: &[String], count: usize) -> Vec<String> {
    let mut seen = HashSet::new();
    bodies
        .iter()
        .filter_map(|b| serde_json::from_str::<Value>(b).ok())
        .filter_map(|v| v["user_id"].as_str().map(str::to_owned))
        .filter(|u| seen.insert(u.clone()))
        .step_by(97)
        .take(count)
        .collect()
}

/// Message ids quarantined as `db_rejected`, with their detail (the SQLSTATE).
async fn db_rejected(env: &TestEnv) -> Vec<(String, String)> {
    let db = env.db().await;
    let rows = db
        .query("SELECT message_id, detail FROM user_logins_quarantine WHERE reason = 'db_rejected'", &[])
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Drains `bodies` while `fault_sql` makes the database refuse the rows of `victims`;
/// asserts each victim costs only itself: quarantined as db_rejected with `sqlstate`, the rest stored.
async fn drain_with_refused_rows(seed: u64, fault_sql: &str, sqlstate: &str) -> String {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let bodies = synthetic_bodies(3_000, seed);
    let victims = victims(&bodies, 5);
    let list = victims.iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(",");
    env.db().await.batch_execute(&fault_sql.replace("$VICTIMS", &list)).await.expect("install the fault");
    let sent = env.publish_with_ids(&bodies).await;
    let started = Instant::now();
    let (ok, summary, logs) = Loginflow::spawn(&env, &["--drain"], &[]).finish(Duration::from_secs(240)).await;
    let took = started.elapsed();
    assert!(ok, "drain finished: {logs}");
    let (lost, duplicated) = env.assert_each_once(&sent, &[]).await;
    let victim_rows = bodies
        .iter()
        .filter(|b| loginflow::decode::decode(b).is_ok())
        .filter(|b| victims.iter().any(|v| b.contains(&format!("\"{v}\""))))
        .count();
    let rejected = db_rejected(&env).await;
    assert_eq!(rejected.len(), victim_rows, "exactly the victims' rows are db_rejected: {rejected:?}");
    assert!(rejected.iter().all(|(_, detail)| detail == sqlstate), "{rejected:?}");
    assert_eq!(summary["quarantined_by_reason"]["db_rejected"], victim_rows as u64);
    assert_eq!(summary["released"], 0);
    assert_no_pii(&env, &bodies, &logs).await;
    format!(
        "sent={} refused_rows={victim_rows} written={} quarantined={} drain_secs={:.1} lost={lost} duplicated={duplicated}",
        sent.len(),
        summary["written"],
        summary["quarantined"],
        took.as_secs_f64()
    )
}

#[tokio::test]
async fn a_trigger_raising_on_one_row_costs_only_that_row() {
    let fault = "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.user_id IN ($VICTIMS) THEN RAISE EXCEPTION 'refused by policy'; END IF; RETURN NEW; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON user_logins FOR EACH ROW EXECUTE FUNCTION refuse();";
    let figures = drain_with_refused_rows(110, fault, "P0001").await;
    println!("figures: trigger_raise {figures}");
}

#[tokio::test]
async fn a_deferred_constraint_failing_at_commit_costs_only_its_rows() {
    // Every user_id but the victims' is known; the foreign key is checked only at COMMIT.
    let fault = "CREATE TABLE known_users (user_id varchar(128) PRIMARY KEY);
        CREATE FUNCTION admit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.user_id NOT IN ($VICTIMS) THEN
            INSERT INTO known_users VALUES (NEW.user_id) ON CONFLICT DO NOTHING; END IF; RETURN NEW; END $$;
        CREATE TRIGGER admit BEFORE INSERT ON user_logins FOR EACH ROW EXECUTE FUNCTION admit();
        ALTER TABLE user_logins ADD CONSTRAINT known_user FOREIGN KEY (user_id) REFERENCES known_users
            DEFERRABLE INITIALLY DEFERRED;";
    let figures = drain_with_refused_rows(111, fault, "23503").await;
    println!("figures: deferred_constraint {figures}");
}

/// What a dead-letter test measured.
struct DeadLetterFigures {
    summary: Value,
    dead_lettered: usize,
    lost: usize,
    duplicated: usize,
    secs: f64,
}

/// Installs `fault_sql`, drains `bodies`, and asserts the drain finishes although the `doomed` messages
/// can never be stored: exactly those reach the DLQ, each after five receives (released once per receive),
/// everything else is stored once, and no PII is anywhere.
async fn drain_past_unstorable_messages(
    env: &TestEnv,
    fault_sql: &str,
    bodies: &[String],
    doomed: usize,
) -> DeadLetterFigures {
    env.migrated_sink().await;
    env.db().await.batch_execute(fault_sql).await.unwrap();
    let sent = env.publish_with_ids(bodies).await;
    let started = Instant::now();
    let (ok, summary, logs) = Loginflow::spawn(env, &["--drain"], &[("VISIBILITY_TIMEOUT_SECS", "5".to_owned())])
        .finish(Duration::from_secs(240))
        .await;
    let secs = started.elapsed().as_secs_f64();
    assert!(ok, "drain finished although some messages can never be stored: {logs}");
    let dead = env.take_dead_letters().await;
    assert_eq!(dead.len(), doomed, "every unstorable message, and only those, is in the DLQ");
    let (lost, duplicated) = env.assert_each_once(&sent, &dead).await;
    assert_eq!(summary["released"], (doomed * 5) as u64, "{summary}");
    assert_no_pii(env, bodies, &logs).await;
    DeadLetterFigures { summary, dead_lettered: dead.len(), lost, duplicated, secs }
}

#[tokio::test]
async fn a_message_not_even_the_quarantine_accepts_reaches_the_dead_letter_queue() {
    let env = TestEnv::new().await;
    // Quarantine refuses everything: malformed messages cannot be stored anywhere.
    let refuse_quarantine = "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'quarantine is closed'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON user_logins_quarantine FOR EACH ROW EXECUTE FUNCTION refuse();";
    let mut bodies = synthetic_bodies(500, 112);
    bodies.extend((0..7).map(|i| format!("not json {i}")));
    let malformed = bodies.iter().filter(|b| loginflow::decode::decode(b).is_err()).count();
    let f = drain_past_unstorable_messages(&env, refuse_quarantine, &bodies, malformed).await;
    println!(
        "figures: unstorable sent={} malformed={malformed} dead_lettered={} released={} written={} lost={} duplicated={}",
        bodies.len(),
        f.dead_lettered,
        f.summary["released"],
        f.summary["written"],
        f.lost,
        f.duplicated
    );
}

/// Installs a trigger on `user_logins` raising `sqlstate` for every row whose `device_type` is
/// `always-fails`, and drains 300 messages with a few such rows: only those reach the DLQ.
async fn drain_past_rows_a_trigger_always_fails(seed: u64, sqlstate: &str, name: &str) {
    let env = TestEnv::new().await;
    let fault = format!(
        "CREATE FUNCTION always_fails() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.device_type = 'always-fails' THEN
             RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER always_fails BEFORE INSERT ON user_logins FOR EACH ROW EXECUTE FUNCTION always_fails();"
    );
    let mut bodies = synthetic_bodies(300, seed);
    let mut victims = 0;
    for body in bodies.iter_mut().step_by(97) {
        if loginflow::decode::decode(body).is_ok() {
            let mut event: Value = serde_json::from_str(body).unwrap();
            event["device_type"] = Value::from("always-fails");
            *body = event.to_string();
            victims += 1;
        }
    }
    assert!(victims >= 3, "{victims}");
    let f = drain_past_unstorable_messages(&env, &fault, &bodies, victims).await;
    assert_eq!(row_count(&env).await as u64, f.summary["written"].as_u64().unwrap(), "the victims' batches committed");
    println!(
        "figures: {name} sqlstate={sqlstate} sent={} victims={victims} dead_lettered={} released={} written={} secs={:.1} lost={} duplicated={}",
        bodies.len(),
        f.dead_lettered,
        f.summary["released"],
        f.summary["written"],
        f.secs,
        f.lost,
        f.duplicated
    );
}

#[tokio::test]
async fn a_record_the_database_always_calls_busy_reaches_the_dead_letter_queue_and_its_batch_commits() {
    // A "busy" SQLSTATE, which retries the whole window, raised every time for one kind of row:
    // only bounded attempts (then one record per transaction) keep it from holding its batch forever.
    drain_past_rows_a_trigger_always_fails(114, "40001", "always_busy").await;
}

#[tokio::test]
async fn a_record_that_always_fails_with_an_unavailable_code_reaches_the_dead_letter_queue() {
    // A code that says "the database is unavailable" (a table gone), raised by a trigger for some
    // rows only: the write probe keeps passing, so after two such probes it is the records' doing.
    drain_past_rows_a_trigger_always_fails(118, "42P01", "always_unavailable_code").await;
}

#[tokio::test]
async fn a_table_locked_longer_than_a_batchs_attempts_releases_nothing() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let bodies = synthetic_bodies(500, 115);
    let sent = env.publish_with_ids(&bodies).await;
    let mut locker = env.db().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE").await.unwrap();
    // Writes time out after 1 s: a batch's 8 attempts run out in ~15 s, well within the lock. The
    // database still answers `SELECT 1` meanwhile; its records are not what fails.
    let process = Loginflow::spawn(&env, &["--drain"], &[("FLUSH_TIMEOUT_SECS", "1".to_owned())]);
    let locked = Duration::from_secs(25);
    tokio::time::sleep(locked).await;
    lock.rollback().await.unwrap();
    let (ok, summary, logs) = process.finish(Duration::from_secs(120)).await;
    assert!(ok, "the drain finished once the lock was gone: {logs}");
    assert_eq!(summary["released"], 0, "a locked table is the database being busy, not the records: {summary}");
    assert!(logs.contains("the database takes no writes now"), "the attempts ran out while locked: {logs}");
    let (lost, duplicated) = env.assert_each_once(&sent, &[]).await;
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: locked_table sent={} locked_secs={} released={} written={} lost={lost} duplicated={duplicated}",
        sent.len(),
        locked.as_secs(),
        summary["released"],
        summary["written"]
    );
}

/// What a SIGTERM-under-fault test measured.
struct SigtermFigures {
    exit_after: Duration,
    first: Value,
    second: Value,
    lost: usize,
    duplicated: usize,
}

/// Sends SIGTERM to `process` and asserts it exits 0 within the grace period + 10 s; runs
/// `end_fault`; then a second run must store every message exactly once, with no PII anywhere.
async fn sigterm_then_drain_again(
    env: &TestEnv,
    process: Loginflow,
    grace: Duration,
    bodies: &[String],
    sent: &[String],
    end_fault: impl AsyncFnOnce(),
) -> SigtermFigures {
    let signalled = Instant::now();
    sigterm(&process);
    let (ok, first, mut logs) = process.finish(grace + Duration::from_secs(30)).await;
    let exit_after = signalled.elapsed();
    end_fault().await;
    assert!(ok, "SIGTERM exits 0: {logs}");
    assert!(exit_after < grace + Duration::from_secs(10), "took {exit_after:?}");
    let (ok, second, more_logs) = Loginflow::spawn(env, &["--drain"], &[]).finish(Duration::from_secs(240)).await;
    assert!(ok);
    logs.push_str(&more_logs);
    let (lost, duplicated) = env.assert_each_once(sent, &[]).await;
    assert_no_pii(env, bodies, &logs).await;
    SigtermFigures { exit_after, first, second, lost, duplicated }
}

#[tokio::test]
async fn sigterm_while_the_table_is_locked_exits_0_and_a_second_run_stores_everything_once() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let bodies = synthetic_bodies(2_000, 113);
    let sent = env.publish_with_ids(&bodies).await;
    let mut locker = env.db().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let grace = Duration::from_secs(2);
    let process = Loginflow::spawn(&env, &["--drain"], &[("SHUTDOWN_GRACE_SECS", grace.as_secs().to_string())]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let unlock = async || {
        lock.rollback().await.unwrap();
        assert_eq!(row_count(&env).await, 0, "the cancelled transactions rolled back");
    };
    let f = sigterm_then_drain_again(&env, process, grace, &bodies, &sent, unlock).await;
    assert_eq!(f.first["deleted"], 0, "nothing uncommitted deleted");
    assert!(f.first["abandoned"].as_u64().unwrap() > 0, "the blocked writes were abandoned: {}", f.first);
    println!(
        "figures: sigterm_locked sent={} grace_secs={} exit_secs={:.2} abandoned={} second_run_written={} lost={} duplicated={}",
        sent.len(),
        grace.as_secs(),
        f.exit_after.as_secs_f64(),
        f.first["abandoned"],
        f.second["written"],
        f.lost,
        f.duplicated
    );
}

#[tokio::test]
async fn sigterm_while_postgres_is_unreachable_exits_0_and_a_second_run_stores_everything_once() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let bodies = synthetic_bodies(6_000, 114);
    let sent = env.publish_with_ids(&bodies).await;
    let grace = Duration::from_secs(3);
    let process = Loginflow::spawn(
        &env,
        &["--drain"],
        &[("SHUTDOWN_GRACE_SECS", grace.as_secs().to_string()), ("BATCH_MAX_ROWS", "200".to_owned())],
    );
    wait_for_rows(&env, 200).await;
    services("postgres-stop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart = async || services("postgres-start");
    let f = sigterm_then_drain_again(&env, process, grace, &bodies, &sent, restart).await;
    println!(
        "figures: sigterm_unreachable sent={} grace_secs={} exit_secs={:.2} first_run_written={} abandoned={} second_run_written={} lost={} duplicated={}",
        sent.len(),
        grace.as_secs(),
        f.exit_after.as_secs_f64(),
        f.first["written"],
        f.first["abandoned"],
        f.second["written"],
        f.lost,
        f.duplicated
    );
}

/// Peak resident memory of a process so far (VmHWM), in bytes.
fn peak_rss(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sends each body on its own and drains them with `MAX_INFLIGHT_BYTES` = `budget`, sampling the
/// process's peak RSS; asserts the drain succeeded, each message is stored once, and the peak is
/// within the bar (budget + 64 MiB). Returns (sent ids, peak bytes, summary, logs, lost, duplicated).
async fn drain_within_the_byte_budget(
    env: &TestEnv,
    bodies: &[String],
    budget: u64,
) -> (Vec<String>, u64, Value, String, usize, usize) {
    let sent = env.send_each(bodies).await;
    let mut process = Loginflow::spawn(env, &["--drain"], &[("MAX_INFLIGHT_BYTES", budget.to_string())]);
    let pid = process.pid();
    let mut peak = 0;
    while process.is_running() {
        peak = peak_rss(&pid).unwrap_or(0).max(peak);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, summary, logs) = process.finish(Duration::from_secs(10)).await;
    assert!(ok, "{logs}");
    let (lost, duplicated) = env.assert_each_once(&sent, &[]).await;
    let limit = budget + (64 << 20);
    assert!(peak > 0 && peak <= limit, "peak RSS {} MiB over the bar of {} MiB", peak >> 20, limit >> 20);
    (sent, peak, summary, logs, lost, duplicated)
}

#[tokio::test]
async fn a_flood_of_1_mib_bodies_stays_within_the_byte_budget_and_loses_nothing() {
    let env = TestEnv::new().await;
    const BODIES: usize = 240;
    let padding = |i: usize| "x".repeat(1_000_000 + i);
    let mut bodies = Vec::new();
    for (i, small) in synthetic_bodies(BODIES as u64, 115).into_iter().enumerate() {
        let mut value: Value = serde_json::from_str(&small).unwrap();
        value["padding"] = Value::String(padding(i));
        if i % 2 == 1 {
            // Malformed: the address hides under another key and the version is gone.
            let ip = value["ip"].take();
            value["client_ip"] = ip;
            value["app_version"] = Value::Null;
        }
        bodies.push(value.to_string());
    }
    assert!(bodies.iter().all(|b| b.len() > 1_000_000 && b.len() <= 1 << 20));
    let budget: u64 = 64 << 20;
    let (sent, peak, summary, logs, lost, duplicated) = drain_within_the_byte_budget(&env, &bodies, budget).await;
    assert_eq!(summary["written"], (BODIES / 2) as u64);
    assert_eq!(summary["quarantined"], (BODIES / 2) as u64);
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: big_bodies sent={} body_mib=1 total_mib={} budget_mib={} peak_rss_mib={} written={} quarantined={} lost={lost} duplicated={duplicated}",
        sent.len(),
        bodies.iter().map(String::len).sum::<usize>() >> 20,
        budget >> 20,
        peak >> 20,
        summary["written"],
        summary["quarantined"]
    );
}

#[tokio::test]
async fn bodies_that_swell_when_scrubbed_stay_within_the_byte_budget() {
    let env = TestEnv::new().await;
    // Every token becomes a 64-character mask: scrubbed whole, each body would be ~8 MiB.
    let dense = |i: usize| {
        let mut text = String::new();
        let mut n = 0usize;
        while text.len() < 1_000_000 {
            text.push_str(&format!(
                "{}.{}.{}.{} 2001:db8::{:x} {:03}-{:02}-{:04} ",
                10 + i % 200,
                n % 250,
                n / 250 % 250,
                n % 7,
                n,
                n % 1000,
                n % 100,
                n % 10000
            ));
            n += 1;
        }
        text
    };
    const BODIES: usize = 60;
    let bodies: Vec<String> = (0..BODIES)
        .map(|i| match i % 2 {
            0 => dense(i),
            _ => serde_json::json!({"user_id": "u", "note": dense(i)}).to_string(),
        })
        .collect();
    assert!(bodies.iter().all(|b| b.len() > 1_000_000 && b.len() <= 1 << 20));
    let budget: u64 = 64 << 20;
    let (sent, peak, summary, _logs, lost, duplicated) = drain_within_the_byte_budget(&env, &bodies, budget).await;
    assert_eq!(summary["quarantined"], BODIES as u64);
    let db = env.db().await;
    let row = db
        .query_one("SELECT max(octet_length(masked_body)), bool_and(masked_body LIKE '%[truncated by loginflow: %') FROM user_logins_quarantine", &[])
        .await
        .unwrap();
    let (largest_copy, all_marked): (i32, bool) = (row.get(0), row.get(1));
    assert!(largest_copy as usize <= 64 << 10, "copy of {largest_copy} bytes");
    assert!(all_marked, "every cut copy says so");
    let tables = dump_tables(&db).await;
    for token in ["10.0.0.0", "2001:db8::1 ", "000-00-0000", "010-10-0010"] {
        assert!(!tables.contains(token), "{token} in the database");
    }
    println!(
        "figures: swelling_bodies sent={} body_mib=1 budget_mib={} peak_rss_mib={} largest_copy_bytes={largest_copy} quarantined={} lost={lost} duplicated={duplicated}",
        sent.len(),
        budget >> 20,
        peak >> 20,
        summary["quarantined"]
    );
}

#[tokio::test]
async fn visibility_extensions_failing_for_a_while_cause_no_redelivery() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let proxy = Proxy::start(env.endpoint.trim_start_matches("http://")).await;
    let bodies = synthetic_bodies(300, 116);
    let sent = env.publish_with_ids(&bodies).await;
    // The table is locked for 28 s, so every message is held past its 20 s visibility timeout.
    // Extensions fall due ~10 s after receipt; the SQS endpoint is gone from 8 s to 15 s, long
    // enough for the SDK's own retries to give up, so loginflow must retry within the timeout.
    let mut locker = env.db().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let settings = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", proxy.port)),
        ("VISIBILITY_TIMEOUT_SECS", "20".to_owned()),
    ];
    let process = Loginflow::spawn(&env, &["--drain"], &settings);
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.down();
    tokio::time::sleep(Duration::from_secs(7)).await;
    proxy.up().await;
    tokio::time::sleep(Duration::from_secs(13)).await;
    lock.commit().await.unwrap();

    let (ok, summary, logs) = process.finish(Duration::from_secs(120)).await;
    assert!(ok, "{logs}");
    assert!(logs.contains("visibility change failed"), "the fault hit the extensions");
    assert_eq!(summary["received"], 300, "no message was delivered twice: {summary}");
    assert_eq!(summary["duplicates"], 0);
    let (lost, duplicated) = env.assert_each_once(&sent, &[]).await;
    assert_no_pii(&env, &bodies, &logs).await;
    println!(
        "figures: failing_extensions sent={} visibility_secs=20 sqs_down_secs=7 held_secs=28 received={} duplicates={} lost={lost} duplicated={duplicated}",
        sent.len(),
        summary["received"],
        summary["duplicates"]
    );
}

/// Where a fault's SQL runs: the cluster's `postgres` database (for `ALTER DATABASE`, which a
/// read-only session cannot run), or the test's own database.
#[derive(Clone, Copy)]
enum On {
    Admin,
    TestDb,
}

async fn run_fault(env: &TestEnv, on: On, sql: &str) {
    let url = match on {
        On::Admin => std::env::var("LOGINFLOW_TEST_DATABASE_URL").expect("admin URL"),
        On::TestDb => env.database_url.clone(),
    };
    let database = env.database_url.rsplit('/').next().unwrap().split('?').next().unwrap();
    connect(&url).await.batch_execute(&sql.replace("$DB", database)).await.expect("fault SQL runs");
}

/// What a write-refusal test measured.
struct RefusalFigures {
    sent: usize,
    sent_during: usize,
    readyz_during: String,
    writable_gauge_during: String,
    resume: Duration,
    summary: Value,
    lost: usize,
    duplicated: usize,
}

/// Drains 3 000 messages, and 200 more sent while the database refuses writes for `spell`
/// (`begin` until `end`); loginflow connects with `settings` (a role, say). Nothing may be
/// quarantined for the spell, nothing released to the redrive policy (visibility 5 s and five
/// receives would move released messages to the DLQ within the spell), `/readyz` must say so,
/// and every message is stored once after it.
async fn drain_while_writes_are_refused(
    env: &TestEnv,
    seed: u64,
    settings: &[(&str, String)],
    begin: (On, &str),
    end: (On, &str),
    spell: Duration,
    sqlstate: &str,
) -> RefusalFigures {
    let bodies = synthetic_bodies(3_000, seed);
    let mut sent = env.publish_with_ids(&bodies).await;
    let port = free_port();
    let mut settings = settings.to_vec();
    settings.extend([
        ("VISIBILITY_TIMEOUT_SECS", "5".to_owned()),
        ("BATCH_MAX_ROWS", "100".to_owned()),
        ("METRICS_ADDR", format!("127.0.0.1:{port}")),
    ]);
    let mut process = Loginflow::spawn(env, &["--drain"], &settings);
    wait_for_rows(env, 200).await;
    run_fault(env, begin.0, begin.1).await;
    let during = synthetic_bodies(200, seed + 1000);
    sent.extend(env.publish_with_ids(&during).await);
    // Long enough for a batch's attempts to run out and the write probe to be asked.
    tokio::time::sleep(spell.min(Duration::from_secs(15))).await;
    let (_, readyz_during) = http_get(port, "/readyz").await.expect("/readyz answers");
    let (_, metrics) = http_get(port, "/metrics").await.expect("/metrics answers");
    let writable_gauge_during =
        metrics.lines().find(|l| l.starts_with("loginflow_database_writable ")).unwrap_or("missing").to_owned();
    tokio::time::sleep(spell.saturating_sub(Duration::from_secs(15))).await;
    assert!(process.is_running(), "loginflow kept running while the database refused writes");
    let rows_before = row_count(env).await;
    run_fault(env, end.0, end.1).await;
    let resume = time_to_progress(env, rows_before).await;
    let (ok, summary, logs) = process.finish(Duration::from_secs(240)).await;
    assert!(ok, "drain finished once the database took writes again: {logs}");
    assert!(readyz_during.contains("database: not taking writes"), "/readyz during the spell: {readyz_during}");
    assert_eq!(writable_gauge_during, "loginflow_database_writable 0");
    assert!(logs.contains(sqlstate), "a log line names SQLSTATE {sqlstate}");
    let dead = env.take_dead_letters().await;
    assert!(dead.is_empty(), "nothing reaches the DLQ: {} did", dead.len());
    assert_eq!(summary["released"], 0, "nothing released to the redrive policy: {summary}");
    assert!(db_rejected(env).await.is_empty(), "nothing quarantined for the database's condition");
    let (lost, duplicated) = env.assert_each_once(&sent, &[]).await;
    let mut all = bodies;
    all.extend(during);
    assert_no_pii(env, &all, &logs).await;
    RefusalFigures {
        sent: sent.len(),
        sent_during: 200,
        readyz_during,
        writable_gauge_during,
        resume,
        summary,
        lost,
        duplicated,
    }
}

fn print_refusal(name: &str, spell: Duration, f: &RefusalFigures) {
    println!(
        "figures: {name} sent={} sent_during={} spell_secs={} readyz_during={:?} gauge_during={:?} resume_secs={:.1} written={} quarantined={} released={} dead_lettered=0 lost={} duplicated={}",
        f.sent,
        f.sent_during,
        spell.as_secs(),
        f.readyz_during.trim(),
        f.writable_gauge_during,
        f.resume.as_secs_f64(),
        f.summary["written"],
        f.summary["quarantined"],
        f.summary["released"],
        f.lost,
        f.duplicated
    );
}

#[tokio::test]
async fn a_read_only_database_for_40_seconds_holds_every_message_and_stores_them_after() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    // What a demoted primary or a managed instance with a full disk looks like: sessions end,
    // and the new ones refuse writes (25006).
    let begin = "ALTER DATABASE $DB SET default_transaction_read_only = on;
        SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$DB' AND pid <> pg_backend_pid();";
    let end = "ALTER DATABASE $DB RESET default_transaction_read_only";
    let spell = Duration::from_secs(40);
    let f = drain_while_writes_are_refused(&env, 120, &[], (On::Admin, begin), (On::Admin, end), spell, "25006").await;
    print_refusal("read_only", spell, &f);
}

#[tokio::test]
async fn a_revoked_insert_privilege_holds_every_message_until_it_is_granted_again() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let role = format!("lf_writer_{}", uuid::Uuid::new_v4().simple());
    run_fault(
        &env,
        On::TestDb,
        &format!(
            "CREATE ROLE {role} LOGIN;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ),
    )
    .await;
    let url = env.database_url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let revoke = format!("REVOKE INSERT ON user_logins FROM {role}");
    let grant = format!("GRANT INSERT ON user_logins TO {role}");
    let spell = Duration::from_secs(20);
    let settings = [("DATABASE_URL", url)];
    let f = drain_while_writes_are_refused(
        &env,
        121,
        &settings,
        (On::TestDb, &revoke),
        (On::TestDb, &grant),
        spell,
        "42501",
    )
    .await;
    print_refusal("revoked_privilege", spell, &f);
}

#[tokio::test]
async fn a_table_renamed_away_and_back_holds_every_message_meanwhile() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let away = "ALTER TABLE user_logins RENAME TO user_logins_away";
    let back = "ALTER TABLE user_logins_away RENAME TO user_logins";
    let spell = Duration::from_secs(20);
    let f =
        drain_while_writes_are_refused(&env, 122, &[], (On::TestDb, away), (On::TestDb, back), spell, "42P01").await;
    print_refusal("table_renamed", spell, &f);
}
