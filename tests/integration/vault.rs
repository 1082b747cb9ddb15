//! The PII vault against LocalStack's KMS and a real PostgreSQL: sealing at ingest, `reveal`
//! (by message id, by masked IP), the access log, tampering, `forget`, and a PII scan.

use std::collections::HashMap;

use serde_json::Value;

use crate::helpers::*;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample_logins.json");

/// A fresh symmetric KMS key on the emulator.
async fn kms_key(env: &TestEnv) -> String {
    let kms = aws_sdk_kms::Client::new(&loginflow::sqs::sdk_config(&sqs_args(&env.endpoint, &env.queue_url)).await);
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
