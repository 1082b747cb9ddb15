//! The PII vault against LocalStack's KMS and a real PostgreSQL: sealing at ingest, `reveal`
//! (by message id, by masked IP), the access log, tampering, `forget`, and a PII scan.

use std::collections::HashMap;

use serde_json::Value;

use crate::helpers::*;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample_logins.json");

/// A fresh symmetric KMS key on the emulator.
async fn kms_key(env: &TestEnv) -> String {
    let kms =
        aws_sdk_kms::Client::new(&loginflow::sqs::sdk_config(&sqs_args(&env.endpoint, &env.queue_url).access()).await);
    let key = kms.create_key().description("loginflow test vault").send().await.expect("KMS CreateKey");
    key.key_metadata.expect("key metadata").key_id
}

async fn reveal(env: &TestEnv, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["reveal", "--reason", "integration test"];
    argv.extend_from_slice(args);
    let out = run_binary(env, &argv, &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "reveal failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect()
}

fn by_id(lines: &[Value]) -> HashMap<String, &Value> {
    lines.iter().map(|line| (line["message_id"].as_str().unwrap().to_owned(), line)).collect()
}

#[tokio::test]
async fn the_vault_seals_the_sample_and_reveal_returns_exactly_the_originals() {
    let env = TestEnv::new().await;
    let key = kms_key(&env).await;
    let sample: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(SAMPLE).unwrap()).unwrap();
    let seeded = run_binary(&env, &["seed", "--file", SAMPLE], &[]).await;
    assert!(seeded.status.success());

    let summary = env.drain(&["--pii-kms-key-id", &key]).await;
    assert_eq!((summary.written, summary.quarantined), (99, 1));

    let db = env.db().await;
    let count = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM user_logins_pii").await, 100, "every message sealed, the malformed one too");
    assert_eq!(count("SELECT count(*) FROM pii_data_keys").await, 1, "one data key (one KMS call) for the whole run");
    let version = env!("CARGO_PKG_VERSION");
    let made = db
        .query_one(
            "SELECT count(DISTINCT mask_key_id), bool_and(mask_key_id IS NOT NULL AND transform_version = $1) FROM user_logins",
            &[&version],
        )
        .await
        .unwrap();
    assert_eq!(
        (made.get::<_, i64>(0), made.get::<_, bool>(1)),
        (1, true),
        "mask_key_id and transform_version on every row"
    );

    // reveal by message id: the exact originals.
    let rows = db
        .query("SELECT message_id, user_id, masked_ip FROM user_logins ORDER BY message_id LIMIT 3", &[])
        .await
        .unwrap();
    let originals: HashMap<&str, &Value> =
        sample.iter().filter_map(|r| Some((r.get("user_id")?.as_str()?, r))).collect();
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let lines = reveal(&env, &["--message-id", &ids[0], "--message-id", &ids[1], "--message-id", &ids[2]]).await;
    assert_eq!(lines.len(), 3);
    let lines_by_id = by_id(&lines);
    for row in &rows {
        let (id, user): (String, String) = (row.get(0), row.get(1));
        let line = lines_by_id[&id];
        assert_eq!(line["user_id"], user.as_str());
        assert_eq!(line["ip"], originals[user.as_str()]["ip"], "{id}");
        assert_eq!(line["device_id"], originals[user.as_str()]["device_id"], "{id}");
    }

    // "Who is behind this masked IP?"
    let masked_ip: String = rows[0].get(2);
    let lines = reveal(&env, &["--masked-ip", &masked_ip]).await;
    let user: String = rows[0].get(1);
    assert!(lines.iter().all(|line| line["ip"] == originals[user.as_str()]["ip"]));
    assert!(by_id(&lines).contains_key(&ids[0]));

    // The quarantined message's original body.
    let quarantined: String = db.query_one("SELECT message_id FROM user_logins_quarantine", &[]).await.unwrap().get(0);
    let lines = reveal(&env, &["--message-id", &quarantined]).await;
    let malformed = sample.iter().find(|r| r.get("user_id").is_none()).unwrap();
    assert_eq!(serde_json::from_str::<Value>(lines[0]["body"].as_str().unwrap()).unwrap(), *malformed);

    // Every access logged, with its reason and the ids it opened.
    let log = db.query("SELECT action, why, message_ids FROM pii_access_log ORDER BY id", &[]).await.unwrap();
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|r| r.get::<_, &str>(0) == "reveal" && r.get::<_, &str>(1) == "integration test"));
    assert_eq!(log[0].get::<_, Vec<String>>(2).len(), 3);

    // No raw value anywhere but the sealed columns.
    let mut visible = dump_tables(&db).await;
    for table in ["pii_access_log", "pii_data_keys"] {
        for row in db.query(&format!("SELECT t::text FROM {table} t"), &[]).await.unwrap() {
            visible.push_str(row.get::<_, &str>(0));
        }
    }
    let sealed: Vec<Vec<u8>> = db
        .query("SELECT coalesce(sealed_ip, '') || coalesce(sealed_device_id, '') || coalesce(sealed_body, '') FROM user_logins_pii", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for record in sample.iter().filter(|r| r.get("ip").is_some()) {
        for field in ["ip", "device_id"] {
            let raw = record[field].as_str().unwrap();
            assert!(!visible.contains(raw), "raw {field} {raw} outside the vault");
            assert!(
                !sealed.iter().any(|s| s.windows(raw.len()).any(|w| w == raw.as_bytes())),
                "{raw} in clear in a sealed column"
            );
        }
    }
}

#[tokio::test]
async fn a_moved_sealed_value_does_not_open_and_forget_erases_a_user() {
    let env = TestEnv::new().await;
    let key = kms_key(&env).await;
    env.publish(synthetic_bodies(20, 21)).await;
    env.drain(&["--pii-kms-key-id", &key]).await;
    let db = env.db().await;
    let rows = db.query("SELECT message_id, user_id FROM user_logins ORDER BY message_id LIMIT 3", &[]).await.unwrap();
    let (a, b, c): (String, String, String) = (rows[0].get(0), rows[1].get(0), rows[2].get(0));

    // Copy b's sealed ip onto a: it must not open there (the associated data binds the row).
    db.execute(
        "UPDATE user_logins_pii SET sealed_ip = (SELECT sealed_ip FROM user_logins_pii WHERE message_id = $2) WHERE message_id = $1",
        &[&a, &b],
    )
    .await
    .unwrap();
    let lines = reveal(&env, &["--message-id", &a, "--message-id", &b]).await;
    let lines = by_id(&lines);
    assert!(lines[&a]["error"].as_str().unwrap().contains("does not open"), "{}", lines[&a]);
    assert!(lines[&a].get("ip").is_none());
    assert!(lines[&b]["ip"].is_string() && lines[&b].get("error").is_none());

    // Erasure: the user's sealed values go, the masks stay, reveal says so.
    let user: String = rows[2].get(1);
    let out = run_binary(&env, &["forget", "--user-id", &user, "--reason", "erasure request 42"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["erased"].as_u64().unwrap() >= 1);
    let lines = reveal(&env, &["--message-id", &c]).await;
    assert!(lines[0]["erased_at"].is_string() && lines[0].get("ip").is_none(), "{}", lines[0]);
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM user_logins_pii p JOIN user_logins l USING (message_id)
             WHERE l.user_id = $1 AND (p.sealed_ip IS NOT NULL OR p.sealed_device_id IS NOT NULL)",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let masks: i64 = db
        .query_one("SELECT count(*) FROM user_logins WHERE user_id = $1 AND masked_ip IS NOT NULL", &[&user])
        .await
        .unwrap()
        .get(0);
    assert!(masks >= 1, "masks stay");
    let forgets: i64 = db
        .query_one("SELECT count(*) FROM pii_access_log WHERE action = 'forget' AND why = 'erasure request 42'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(forgets, 1);
}

/// A login body with chosen fields: a pool of few addresses and device ids, so equal raw values recur.
fn login_body(i: usize, device_type: &str) -> (String, String, String, String) {
    let user = format!("user-{i:05}");
    let ip = format!("198.51.100.{}", i % 37);
    let device_id = format!("{:03}-{:02}-{:04}", 100 + i % 23, 10 + i % 23, 1000 + i % 23);
    let body = serde_json::json!({"user_id": user, "app_version": "2.3.0", "device_type": device_type,
                                  "ip": ip, "locale": "RU", "device_id": device_id})
    .to_string();
    (body, user, ip, device_id)
}

/// Every table and the access log as text, and the sealed columns' bytes: for leak scans.
async fn assert_no_raw_value_outside_the_vault(db: &tokio_postgres::Client, raw: &[&str]) {
    let mut visible = dump_tables(db).await;
    for table in ["pii_access_log", "pii_data_keys"] {
        for row in db.query(&format!("SELECT t::text FROM {table} t"), &[]).await.unwrap() {
            visible.push_str(row.get::<_, &str>(0));
        }
    }
    for value in raw {
        assert!(!visible.contains(value), "raw value {value} outside the vault");
    }
}

#[tokio::test]
async fn remask_to_a_new_key_changes_every_mask_consistently_and_survives_being_killed_halfway() {
    const NEW_KEY: &str = "rotated-integration-key-fedcba9876543210";
    let env = TestEnv::new().await;
    let key = kms_key(&env).await;
    let logins: Vec<_> = (0..2000).map(|i| login_body(i, "android")).collect();
    let mut bodies: Vec<String> = logins.iter().map(|l| l.0.clone()).collect();
    // Quarantined, with PII under other keys: their clear copies are re-scrubbed too.
    let hidden_ip = "203.0.113.201";
    bodies.push(serde_json::json!({"client_ip": hidden_ip, "user": "q-1"}).to_string());
    bodies.push(format!("not json, from {hidden_ip}"));
    env.publish(bodies).await;
    let summary = env.drain(&["--pii-kms-key-id", &key]).await;
    assert_eq!((summary.written, summary.quarantined), (2000, 2));

    let new_key_id =
        loginflow::masker::Masker::new(&secrecy::SecretString::from(NEW_KEY.to_owned())).key_id().to_string();
    let raw_by_user: HashMap<&str, (&str, &str)> =
        logins.iter().map(|(_, user, ip, device)| (user.as_str(), (ip.as_str(), device.as_str()))).collect();
    let db = env.db().await;
    let old_key_id: String = db.query_one("SELECT min(mask_key_id) FROM user_logins", &[]).await.unwrap().get(0);
    assert_ne!(old_key_id, new_key_id);

    // Every row is wholly under one key: masks, and the key id that names them.
    let assert_consistent = |rows: Vec<tokio_postgres::Row>| {
        let mut under_new = 0;
        for row in rows {
            let (user, masked_ip, masked_device, key_id): (String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let (ip, device) = raw_by_user[user.as_str()];
            let key = if key_id == new_key_id {
                under_new += 1;
                NEW_KEY
            } else {
                assert_eq!(key_id, old_key_id);
                MASK_KEY
            };
            assert_eq!(masked_ip, hmac_hex_with(key, ip), "{user}: ip mask and key id agree");
            assert_eq!(masked_device, hmac_hex_with(key, device), "{user}: device mask and key id agree");
        }
        under_new
    };
    let select = "SELECT user_id, masked_ip, masked_device_id, mask_key_id FROM user_logins";

    // Killed halfway: started, then SIGKILLed as soon as some batches have committed.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_loginflow"))
        .args(["remask", "--batch-rows", "5"])
        .envs(env.binary_env())
        .env("MASK_KEY", NEW_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("remask starts");
    let count_new = "SELECT count(*) FROM user_logins WHERE mask_key_id = $1";
    let waited = tokio::time::timeout(DRAIN_TIMEOUT, async {
        loop {
            let done: i64 = db.query_one(count_new, &[&new_key_id]).await.unwrap().get(0);
            if done > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "remask committed a batch");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let at_kill = assert_consistent(db.query(select, &[]).await.unwrap());
    assert!(at_kill > 0 && at_kill < 2000, "killed halfway: {at_kill} of 2000 rows re-masked");

    // Run again: it resumes, and finishes every row.
    let out = run_binary(&env, &["remask", "--batch-rows", "200"], &[("MASK_KEY", NEW_KEY)]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows"], 2000 - at_kill as u64, "{report}");
    assert_eq!(report["left_under_an_older_key"], 0, "{report}");
    assert_eq!(assert_consistent(db.query(select, &[]).await.unwrap()), 2000);
    let shared: i64 = db.query_one("SELECT count(DISTINCT masked_ip) FROM user_logins", &[]).await.unwrap().get(0);
    assert_eq!(shared, 37, "equal raw addresses still share one mask");

    // Quarantine copies: under the new key, the hidden address masked with it, never raw.
    let quarantine = db.query("SELECT masked_body, mask_key_id FROM user_logins_quarantine", &[]).await.unwrap();
    assert_eq!(quarantine.len(), 2);
    for row in &quarantine {
        let (body, key_id): (String, String) = (row.get(0), row.get(1));
        assert_eq!(key_id, new_key_id);
        assert!(body.contains(&hmac_hex_with(NEW_KEY, hidden_ip)) && !body.contains(hidden_ip), "{body}");
    }

    // A third run has nothing to do; every batch was audited.
    let out = run_binary(&env, &["remask"], &[("MASK_KEY", NEW_KEY)]).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["rows"].as_u64(), report["quarantined"].as_u64()), (Some(0), Some(0)), "{report}");
    let audited: i64 = db
        .query_one("SELECT count(DISTINCT m) FROM pii_access_log, unnest(message_ids) m WHERE action = 'remask'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 2002, "every message whose sealed values were opened is in the access log");
    let mut raw: Vec<&str> = logins.iter().flat_map(|l| [l.2.as_str(), l.3.as_str()]).collect();
    raw.push(hidden_ip);
    assert_no_raw_value_outside_the_vault(&db, &raw).await;
}

async fn received_at(db: &tokio_postgres::Client, ids: &[String]) -> Vec<chrono::DateTime<chrono::Utc>> {
    let rows = db
        .query("SELECT received_at FROM user_logins_quarantine WHERE message_id = ANY($1) ORDER BY message_id", &[&ids])
        .await
        .unwrap();
    assert_eq!(rows.len(), ids.len());
    rows.iter().map(|r| r.get(0)).collect()
}

/// A KMS key for the vault, and a stricter rule of the database (relaxed later by the test):
/// no tablets, constraint `no_tablets`.
async fn refuse_tablets(env: &TestEnv) -> (String, tokio_postgres::Client) {
    let key = kms_key(env).await;
    env.migrated_sink().await;
    let db = env.db().await;
    db.batch_execute("ALTER TABLE user_logins ADD CONSTRAINT no_tablets CHECK (device_type <> 'tablet')")
        .await
        .unwrap();
    (key, db)
}

#[tokio::test]
async fn quarantine_replay_turns_records_quarantined_under_a_stricter_rule_into_rows_exactly_once() {
    let env = TestEnv::new().await;
    let (key, db) = refuse_tablets(&env).await;
    let logins: Vec<_> = (0..200).map(|i| login_body(i, if i % 10 == 3 { "tablet" } else { "android" })).collect();
    let mut bodies: Vec<String> = logins.iter().map(|l| l.0.clone()).collect();
    // SNS envelopes: quarantined while the pipeline reads bodies raw (a stricter input rule).
    let wrapped: Vec<_> = (200..205).map(|i| login_body(i, "ios")).collect();
    for (i, (event, ..)) in wrapped.iter().enumerate() {
        bodies.push(
            serde_json::json!({"Type": "Notification", "MessageId": format!("00000000-0000-4000-8000-00000000000{i}"),
                               "TopicArn": "arn:aws:sns:us-east-1:000000000000:logins", "Message": event})
            .to_string(),
        );
    }
    // SNS delivers at least once: the first notification twice.
    bodies.push(bodies[200].clone());
    // Malformed for good.
    for i in 0..3 {
        bodies.push(serde_json::json!({"foo": "oops", "ip": format!("203.0.113.{}", 50 + i)}).to_string());
    }
    let sent = env.publish_with_ids(&bodies).await;
    let summary = env.drain(&["--pii-kms-key-id", &key, "--input-format", "raw"]).await;
    assert_eq!((summary.written, summary.quarantined), (180, 29), "{summary:?}");
    // Each message once: the notifications under their SNS ids (as `run` keys them), one row for
    // the notification delivered twice.
    let mut expected: Vec<String> = sent[..200].iter().chain(&sent[206..]).cloned().collect();
    expected.extend((0..5).map(|i| format!("sns:00000000-0000-4000-8000-00000000000{i}")));
    expected.sort();
    let assert_each_message_once = || async {
        let stored = env.stored_ids().await;
        let mut ids: Vec<String> = stored.keys().cloned().collect();
        ids.sort();
        assert_eq!(ids, expected);
        assert!(stored.values().all(|n| *n == 1), "an id both a row and quarantined");
        env.assert_queue_empty().await;
    };

    let replay = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            let mut argv = vec!["quarantine", "replay"];
            argv.extend_from_slice(args);
            let out = run_binary(env, &argv, &[]).await;
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    let counts = || async {
        let row = db
            .query_one("SELECT (SELECT count(*) FROM user_logins), (SELECT count(*) FROM user_logins_quarantine)", &[])
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };

    let malformed_received = received_at(&db, &sent[206..]).await;
    // While the rule still holds, the refused rows are refused again and stay.
    let report = replay(&["--reason", "db_rejected"]).await;
    assert_eq!(report["examined"], 20, "{report}");
    assert_eq!(report["written"], 0, "{report}");
    assert_eq!(report["still_quarantined"]["db_rejected"], 20, "{report}");
    assert_eq!(counts().await, (180, 29));

    // Rules relaxed: the database's and the input's.
    db.batch_execute("ALTER TABLE user_logins DROP CONSTRAINT no_tablets").await.unwrap();
    let report = replay(&["--input-format", "auto"]).await;
    assert_eq!(report["examined"], 29, "{report}");
    assert_eq!(report["written"], 25, "{report}");
    assert_eq!(report["already_stored"], 1, "the second delivery of one notification: {report}");
    assert_eq!(report["still_quarantined"], serde_json::json!({"missing_field": 3}), "{report}");
    assert_eq!(counts().await, (205, 3));
    assert_each_message_once().await;

    // The replayed rows are masked and sealed as the pipeline would have done it.
    for (_, user, ip, device) in logins.iter().filter(|l| l.0.contains("tablet")).chain(&wrapped) {
        let row = db
            .query_one("SELECT masked_ip, masked_device_id, message_id FROM user_logins WHERE user_id = $1", &[user])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), hmac_hex(ip));
        assert_eq!(row.get::<_, String>(1), hmac_hex(device));
        if user == &wrapped[0].1 {
            let id: String = row.get(2);
            let lines = reveal(&env, &["--message-id", &id]).await;
            assert_eq!(
                (lines[0]["ip"].as_str(), lines[0]["device_id"].as_str()),
                (Some(ip.as_str()), Some(device.as_str()))
            );
        }
    }

    // Idempotent: a second run finds only what still fails.
    let report = replay(&[]).await;
    assert_eq!((report["examined"].as_u64(), report["written"].as_u64()), (Some(3), Some(0)), "{report}");
    assert_eq!(counts().await, (205, 3));
    assert_each_message_once().await;
    assert_eq!(received_at(&db, &sent[206..]).await, malformed_received, "received_at kept through replays");
    let replays: i64 =
        db.query_one("SELECT count(*) FROM pii_access_log WHERE action = 'replay'", &[]).await.unwrap().get(0);
    assert!(replays >= 3);
    let mut raw: Vec<&str> = logins.iter().chain(&wrapped).flat_map(|l| [l.2.as_str(), l.3.as_str()]).collect();
    raw.extend(["203.0.113.50", "203.0.113.51", "203.0.113.52"]);
    assert_no_raw_value_outside_the_vault(&db, &raw).await;
}

#[tokio::test]
async fn forget_erases_the_quarantined_bodies_that_name_the_user_and_no_others() {
    let env = TestEnv::new().await;
    let key = kms_key(&env).await;
    let (valid, user, ..) = login_body(1, "ios");
    let (_, other, ..) = login_body(2, "ios");
    let malformed = |user: &str| serde_json::json!({"user_id": user, "ip": "203.0.113.9"}).to_string();
    let bodies = vec![
        valid,
        malformed(&user),
        // Double-encoded: the clear copy holds the id JSON-escaped.
        serde_json::to_string(&malformed(&user)).unwrap(),
        // Spaced as a hand-written body: still the user's.
        format!("{{ \"user_id\" : \"{user}\", \"ip\": \"203.0.113.10\" }}"),
        malformed(&other),
        // Another user's body that mentions the id under another key is not theirs.
        serde_json::json!({"user_id": other, "referred_by": user, "ip": "203.0.113.11"}).to_string(),
        // Under another key, in free text, in a body that is not JSON: still the user's.
        serde_json::json!({"userId": user, "ip": "203.0.113.12"}).to_string(),
        serde_json::json!({"note": format!("login by user {user} from 203.0.113.13")}).to_string(),
        format!("user_id={user} ip=203.0.113.14 (cut sho"),
    ];
    let ids = env.publish_with_ids(&bodies).await;
    let summary = env.drain(&["--pii-kms-key-id", &key]).await;
    assert_eq!((summary.written, summary.quarantined), (1, 8));

    let out = run_binary(&env, &["forget", "--user-id", &user, "--reason", "erasure request 7"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = env.db().await;
    let erased: Vec<String> = db
        .query("SELECT message_id FROM user_logins_pii WHERE erased_at IS NOT NULL ORDER BY message_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = ids[..4].to_vec();
    expected.extend_from_slice(&ids[6..]);
    expected.sort();
    assert_eq!(erased, expected, "the user's row and the six quarantined bodies naming them");
    for id in &ids[4..6] {
        let kept: Option<Vec<u8>> =
            db.query_one("SELECT sealed_body FROM user_logins_pii WHERE message_id = $1", &[id]).await.unwrap().get(0);
        assert!(kept.is_some(), "another user's quarantined body stays sealed");
    }

    let out = run_binary(&env, &["forget", "--user-id", "", "--reason", "x"], &[]).await;
    assert!(!out.status.success(), "an empty user id is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("must not be empty"));
}

#[tokio::test]
async fn replay_and_remask_go_past_a_data_key_kms_refuses_and_a_rebuilt_event_stays_replayable() {
    let env = TestEnv::new().await;
    let (key, db) = refuse_tablets(&env).await;
    // Two runs, two data keys: three refused rows sealed under each.
    let mut sent = Vec::new();
    for run in 0..2 {
        let bodies: Vec<String> = (0..3).map(|i| login_body(run * 3 + i, "tablet").0).collect();
        sent.extend(env.publish_with_ids(&bodies).await);
        let summary = env.drain(&["--pii-kms-key-id", &key]).await;
        assert_eq!((summary.written, summary.quarantined), (0, 3), "{summary:?}");
    }
    // The first key's wrapped copy is damaged: KMS refuses it for good.
    db.execute(
        "UPDATE pii_data_keys SET wrapped_key = '\\x00010203'::bytea
         WHERE id = (SELECT data_key_id FROM user_logins_pii WHERE message_id = $1)",
        &[&sent[0]],
    )
    .await
    .unwrap();
    // One refused row's copy is no login today's validator accepts (as if it had become stricter).
    db.execute(
        "UPDATE user_logins_quarantine SET masked_body = jsonb_set(masked_body::jsonb, '{app_version_text}', '\"\"')::text
         WHERE message_id = $1",
        &[&sent[3]],
    )
    .await
    .unwrap();
    db.batch_execute("ALTER TABLE user_logins DROP CONSTRAINT no_tablets").await.unwrap();

    let replay = || async {
        let out = run_binary(&env, &["quarantine", "replay"], &[]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = replay().await;
    assert_eq!(report["examined"], 6, "{report}");
    assert_eq!(report["does_not_open"], 3, "the damaged key's records are counted, not fatal: {report}");
    assert_eq!(report["written"], 2, "{report}");
    let still: u64 = report["still_quarantined"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(still, 1, "{report}");
    let sealed_body: Option<Vec<u8>> = db
        .query_one("SELECT sealed_body FROM user_logins_pii WHERE message_id = $1", &[&sent[3]])
        .await
        .unwrap()
        .get(0);
    assert!(sealed_body.is_some(), "the rebuilt event is sealed for the next replay");

    // Replayed again: the still-refused record is still replayable, not lost as `not_sealed`.
    let report = replay().await;
    assert_eq!(report["examined"], 4, "{report}");
    assert_eq!(report["does_not_open"], 3, "{report}");
    assert_eq!(report["not_sealed"], 0, "{report}");

    // Remask goes past the damaged key too.
    let out = run_binary(&env, &["remask"], &[("MASK_KEY", "rotated-integration-key-0123456789abcd")]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows"], 2, "{report}");
    assert_eq!(report["quarantined"], 1, "{report}");
    assert_eq!(report["does_not_open"], 3, "{report}");
    let raw: Vec<String> = (0..6).flat_map(|i| [login_body(i, "tablet").2, login_body(i, "tablet").3]).collect();
    assert_no_raw_value_outside_the_vault(&db, &raw.iter().map(String::as_str).collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn shutdown_while_kms_does_not_answer_ends_the_run_at_once() {
    let env = TestEnv::new().await;
    // A key service that accepts connections and never answers (each SDK attempt would wait 30 s).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let (asked, asked_kms) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut asked = Some(asked);
        loop {
            held.push(silent.accept().await.unwrap().0);
            if let Some(asked) = asked.take() {
                let _ = asked.send(());
            }
        }
    });
    let mut args = env.run_args(&["--pii-kms-key-id", "alias/never-answers"]);
    args.sqs.aws_endpoint_url = Some(endpoint);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(loginflow::run(args.settings().expect("test settings"), async move {
        let _ = stopped.await;
    }));

    tokio::time::timeout(std::time::Duration::from_secs(30), asked_kms).await.expect("the vault asks KMS").unwrap();
    let signalled = std::time::Instant::now();
    stop.send(()).unwrap();
    let summary = tokio::time::timeout(std::time::Duration::from_secs(10), run)
        .await
        .expect("run returns soon after shutdown, without waiting for KMS")
        .unwrap()
        .expect("a shutdown before the pipeline started is a clean exit");
    assert!(signalled.elapsed() < std::time::Duration::from_secs(5), "took {:?}", signalled.elapsed());
    assert_eq!(summary.received, 0);
    listener.abort();
}
