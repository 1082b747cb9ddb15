//! The operations endpoint and the shipped dashboard, against a live run and a real Prometheus.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;

use crate::helpers::*;

#[path = "../support/dashboards.rs"]
mod dashboards;

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts `loginflow run` (no drain) in the background; send on the returned channel to stop it.
fn start_run(
    env: &TestEnv,
    extra: &[&str],
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<loginflow::RunSummary, loginflow::RunError>>) {
    let mut args = env.run_args(extra);
    args.drain = false;
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(loginflow::run(args.settings().expect("test settings"), async move {
        let _ = stopped.await;
    }));
    (stop, run)
}

#[tokio::test]
async fn health_is_up_while_readiness_reports_an_unreachable_database() {
    let env = TestEnv::new().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (stop, run) =
        start_run(&env, &["--metrics-addr", &addr, "--database-url", "postgres://postgres@127.0.0.1:1/x"]);

    let (status, body) = wait_for("/healthz", async || http_get(port, "/healthz").await).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(port, "/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(body, "database: unreachable\nqueue: reachable\n");
    // The series exists from startup at 0; the failed migrations must have counted retries.
    let retries = async || {
        let (_, body) = http_get(port, "/metrics").await?;
        let line = body.lines().find(|l| l.starts_with("loginflow_retries_total{stage=\"sink\"}"))?.to_owned();
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        (value >= 1.0).then_some(value)
    };
    wait_for("sink retries counted", retries).await;

    // SIGTERM before the schema exists is a clean stop, not an error.
    let stopped = std::time::Instant::now();
    stop.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap().unwrap();
    assert_eq!(summary, loginflow::RunSummary::default());
    assert!(stopped.elapsed() < Duration::from_secs(5), "took {:?}", stopped.elapsed());
}

#[tokio::test]
async fn readiness_stays_ok_while_every_sink_connection_is_busy() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    env.publish_with_ids(&synthetic_bodies(20, 7)).await;
    // The only sink connection waits on a locked table; the database itself is fine.
    let mut locker = env.db().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (stop, run) = start_run(&env, &["--metrics-addr", &addr, "--sink-connections", "1"]);
    let busy = async || {
        let (_, body) = http_get(port, "/metrics").await?;
        body.lines().any(|l| l.starts_with("loginflow_inflight_messages ") && !l.ends_with(" 0")).then_some(())
    };
    wait_for("messages held by a blocked write", busy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http_get(port, "/readyz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "database: reachable\nqueue: reachable\n"));
    lock.rollback().await.unwrap();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), run).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn readiness_is_ok_when_database_and_queue_are_reachable() {
    let env = TestEnv::new().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (stop, run) = start_run(&env, &["--metrics-addr", &addr]);
    let (status, body) = wait_for("/readyz", async || http_get(port, "/readyz").await.filter(|(s, _)| *s == 200)).await;
    assert_eq!((status, body.as_str()), (200, "database: reachable\nqueue: reachable\n"));
    stop.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap().unwrap();
    assert_eq!(summary.received, 0);
}

async fn prometheus_get(port: u16, expr: &str) -> Option<(u16, String)> {
    http_get(port, &format!("/api/v1/query?query={}", percent_encode(expr))).await
}

/// Evaluates an instant query; `None` while Prometheus is not up and ready yet.
async fn try_prometheus_query(port: u16, expr: &str) -> Option<Value> {
    let (status, body) = prometheus_get(port, expr).await?;
    (status == 200).then(|| serde_json::from_str(&body).expect("prometheus JSON"))
}

async fn prometheus_query(port: u16, expr: &str) -> Value {
    let (status, body) = prometheus_get(port, expr).await.expect("prometheus answers");
    assert_eq!(status, 200, "query {expr} failed: {body}");
    serde_json::from_str(&body).expect("prometheus JSON")
}

#[tokio::test]
async fn prometheus_scrapes_a_live_run_and_every_panel_and_alert_query_evaluates() {
    let prometheus_bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    let env = TestEnv::new().await;
    // Make every panel see real events: the database refuses one user's rows (db_rejected), and
    // rows for some messages already exist (a crash after commit, before delete: duplicates).
    env.migrated_sink().await;
    let waves = [synthetic_bodies(1000, 30), synthetic_bodies(1000, 31)];
    let refused_user = waves[0]
        .iter()
        .find(|b| loginflow::decode::decode(b).is_ok())
        .and_then(|b| serde_json::from_str::<Value>(b).ok())
        .and_then(|v| v["user_id"].as_str().map(str::to_owned))
        .unwrap();
    let refused =
        waves.iter().flatten().filter(|b| b.contains(&refused_user) && loginflow::decode::decode(b).is_ok()).count();
    env.db()
        .await
        .batch_execute(&format!("ALTER TABLE user_logins ADD CONSTRAINT refused CHECK (user_id <> '{refused_user}')"))
        .await
        .unwrap();
    let (metrics_port, prometheus_port) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    // A process of its own, so its counters are its alone (in-process runs share one recorder).
    let loginflow = tokio::process::Command::new(env!("CARGO_BIN_EXE_loginflow"))
        .arg("run")
        .envs(env.binary_env())
        .env("METRICS_ADDR", &metrics_addr)
        .env("BATCH_MAX_WAIT_MS", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("loginflow starts");

    let dir = std::env::temp_dir().join(format!("loginflow-prometheus-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/alerts.yml");
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{rules:?}]\n\
         scrape_configs:\n  - job_name: loginflow\n    static_configs: [{{ targets: [\"{metrics_addr}\"] }}]\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut prometheus = tokio::process::Command::new(&prometheus_bin)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {prometheus_bin} (scripts/test.sh installs it): {e}"));

    wait_for("the first scrape", async || {
        let up = try_prometheus_query(prometheus_port, "up{job=\"loginflow\"} == 1").await?;
        (!up["data"]["result"].as_array()?.is_empty()).then_some(())
    })
    .await;
    // Traffic in two waves while Prometheus scrapes every second. Before the second wave is
    // published, rows for ten of its messages are stored as if an earlier run had committed them.
    let db = env.db().await;
    let first = env.publish_with_ids(&waves[0]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let valid_second: Vec<&String> = waves[1].iter().filter(|b| loginflow::decode::decode(b).is_ok()).collect();
    // Delayed, so the rows below are stored before loginflow can receive these messages.
    let second = env.publish_delayed(&waves[1], 4).await;
    let valid_ids: Vec<&String> = second
        .iter()
        .zip(&waves[1])
        .filter(|(_, b)| loginflow::decode::decode(b).is_ok() && !b.contains(&refused_user))
        .map(|(id, _)| id)
        .take(10)
        .collect();
    for id in &valid_ids {
        db.execute("INSERT INTO user_logins (message_id, user_id) VALUES ($1, 'stored earlier')", &[id]).await.unwrap();
    }
    let stored_earlier = valid_ids.len();
    assert_eq!(stored_earlier, 10);
    assert!(valid_second.len() > 900);
    let expected_rows = (1980 - refused) as i64;
    wait_for("all rows", async || {
        let n: i64 = db.query_one("SELECT count(*) FROM user_logins", &[]).await.ok()?.get(0);
        (n == expected_rows).then_some(())
    })
    .await;
    assert_eq!(first.len() + second.len(), 2000);
    tokio::time::sleep(Duration::from_secs(4)).await;

    for (title, expr) in dashboards::dashboard_queries() {
        let query = expr.replace("$__rate_interval", "1m");
        let answer = prometheus_query(prometheus_port, &query).await;
        let result = answer["data"]["result"].as_array().expect("result");
        assert!(!result.is_empty(), "panel {title:?} has no data: {query}");
        let numbers: Vec<f64> = result.iter().filter_map(|s| s["value"][1].as_str()?.parse().ok()).collect();
        assert!(numbers.iter().any(|v| v.is_finite()), "panel {title:?} has only NaN: {query} -> {result:?}");
    }
    let written = prometheus_query(prometheus_port, "sum(loginflow_records_written_total)").await;
    let expected_written = (1980 - refused - stored_earlier).to_string();
    assert_eq!(written["data"]["result"][0]["value"][1], expected_written.as_str());
    // The panels of rare events saw their events, not only zeros.
    for (expr, expected) in [
        ("sum(loginflow_duplicates_dropped_total{stage=\"database\"})", stored_earlier.to_string()),
        ("sum(loginflow_quarantined_total{reason=\"db_rejected\"})", refused.to_string()),
        ("sum(loginflow_errors_total{stage=\"sink\",kind=\"rejected_record\"})", refused.to_string()),
    ] {
        let answer = prometheus_query(prometheus_port, expr).await;
        assert_eq!(answer["data"]["result"][0]["value"][1], expected.as_str(), "{expr}");
    }
    for (title, expr) in dashboards::dashboard_queries() {
        if title.contains("uplicate") || title.contains("uarantine") {
            let query = format!("max_over_time(({})[1m:1s])", expr.replace("$__rate_interval", "1m"));
            let answer = prometheus_query(prometheus_port, &query).await;
            let peak = answer["data"]["result"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .fold(0.0, f64::max);
            assert!(peak > 0.0, "panel {title:?} only ever showed zero: {query}");
        }
    }
    for (alert, expr) in dashboards::alert_rules() {
        let answer = prometheus_query(prometheus_port, &expr).await;
        assert_eq!(answer["status"], "success", "alert {alert}: {answer}");
    }
    let (_, rules) = http_get(prometheus_port, "/api/v1/rules").await.unwrap();
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let loaded = rules["data"]["groups"][0]["rules"].as_array().expect("rules loaded");
    assert_eq!(loaded.len(), dashboards::alert_rules().len());
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    for args in [vec!["check", "rules", rules_path()], vec!["check", "config", config_path()]] {
        let promtool = std::process::Command::new("promtool").args(&args).output().expect("promtool runs");
        assert!(promtool.status.success(), "promtool {args:?}: {}", String::from_utf8_lossy(&promtool.stdout));
    }

    let pid = loginflow.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let output = tokio::time::timeout(Duration::from_secs(30), loginflow.wait_with_output()).await.unwrap().unwrap();
    assert!(output.status.success(), "SIGTERM ends the run with exit 0");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["written"], (1980 - refused - stored_earlier) as u64);
    prometheus.kill().await.ok();
    std::fs::remove_dir_all(dir).ok();
}

fn rules_path() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/alerts.yml")
}

fn config_path() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/prometheus.yml")
}

/// A series' value on a `/metrics` page (summed over its labels when `labels` is empty).
fn series(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|line| {
            let Some(rest) = line.strip_prefix(name) else { return false };
            match labels {
                "" => rest.starts_with(' ') || rest.starts_with('{'),
                labels => rest.starts_with(&format!("{{{labels}}}")),
            }
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn pollers_grow_on_a_backlog_retire_when_it_is_gone_and_an_idle_queue_costs_only_its_long_polls() {
    let env = TestEnv::new().await;
    env.publish(synthetic_bodies(3_000, 31)).await;
    let port = free_port();
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_loginflow"))
        .arg("run")
        .envs(env.binary_env())
        .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("RECEIVE_WAIT_SECS", "2")
        .env("MAX_POLLERS", "8")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("loginflow starts");
    let mut most_pollers = 0.0_f64;
    let page = async || http_get(port, "/metrics").await.map(|(_, body)| body);
    wait_for("the backlog stored", async || {
        let page = page().await?;
        most_pollers = most_pollers.max(series(&page, "loginflow_pollers", ""));
        (series(&page, "loginflow_records_written_total", "") >= 2_970.0).then_some(())
    })
    .await;
    wait_for("pollers back to MIN_POLLERS", async || {
        let page = page().await?;
        (series(&page, "loginflow_pollers", "") == 1.0).then_some(())
    })
    .await;
    // Idle: one poller's long polls of 2 s, nothing else (the depth is read once a minute).
    let requests = |page: &str| series(page, "loginflow_sqs_requests_total", "");
    let before = requests(&page().await.expect("metrics"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = requests(&page().await.expect("metrics")) - before;
    let _ = std::process::Command::new("kill").args(["-TERM", &process.id().unwrap().to_string()]).status();
    let _ = tokio::time::timeout(Duration::from_secs(30), process.wait()).await;
    assert!(most_pollers >= 2.0, "pollers grew on the backlog: at most {most_pollers}");
    assert!(idle <= 7.0, "{idle} SQS requests in 10 idle seconds (5 long polls of 2 s expected)");
    println!("figures: adaptive_pollers most={most_pollers} idle_requests_per_10s={idle}");
}
