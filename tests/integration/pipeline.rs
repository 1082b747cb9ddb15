//! The pipeline end to end, against real PostgreSQL and a real SQS emulator.

use std::collections::{HashMap, HashSet};

use chrono::{Duration as ChronoDuration, Utc};
use loginflow::decode::{decode, AppVersion};
use loginflow::masker::Masker;
use loginflow::records::MessageMeta;
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn sample_drains_into_masked_rows_and_quarantine_with_nothing_leaked() {
    let env = TestEnv::new().await;
    let sample_path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample_logins.json");
    let sample: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(sample_path).unwrap()).unwrap();
    let valid: Vec<&Value> = sample.iter().filter(|r| r.get("user_id").is_some()).collect();
    assert_eq!((sample.len(), valid.len()), (100, 99), "the project's sample has the task sample's shape");
    let started = Utc::now() - ChronoDuration::seconds(5);

    let debug_logs = [("RUST_LOG", "trace")];
    let seeded = run_binary(&env, &["seed", "--file", sample_path], &debug_logs).await;
    assert!(seeded.status.success(), "seed failed: {}", String::from_utf8_lossy(&seeded.stderr));
    let ran = run_binary(&env, &["run", "--drain"], &debug_logs).await;
    let logs = format!(
        "{}{}{}",
        String::from_utf8_lossy(&seeded.stderr),
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(ran.status.success(), "run failed: {logs}");
    let summary: Value = serde_json::from_slice(&ran.stdout).expect("run prints a JSON summary");
    assert_eq!(summary["written"], 99);
    assert_eq!(summary["quarantined"], 1);
    assert_eq!(summary["deleted"], 100);

    let db = env.db().await;
    let rows = db
        .query(
            "SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, app_version_text,
                    loginflow_app_version_text(app_version), create_date = (sent_at AT TIME ZONE 'UTC')::date,
                    sent_at >= $1 AND sent_at <= now()
             FROM user_logins",
            &[&started],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 99);
    let by_user: HashMap<&str, &Value> = valid.iter().map(|r| (r["user_id"].as_str().unwrap(), *r)).collect();
    let mut null_locales = 0;
    for row in &rows {
        let source = by_user[row.get::<_, &str>(0)];
        assert_eq!(row.get::<_, &str>(1), source["device_type"].as_str().unwrap());
        assert_eq!(row.get::<_, String>(2), hmac_hex(source["ip"].as_str().unwrap()));
        assert_eq!(row.get::<_, String>(3), hmac_hex(source["device_id"].as_str().unwrap()));
        assert_eq!(row.get::<_, Option<&str>>(4), source["locale"].as_str());
        null_locales += usize::from(row.get::<_, Option<&str>>(4).is_none());
        let version = source["app_version"].as_str().unwrap();
        assert_eq!(row.get::<_, &str>(6), version);
        assert_eq!(row.get::<_, &str>(7), version, "the integer decodes back to the original string");
        assert_eq!(AppVersion::parse(version).unwrap().code, row.get::<_, i32>(5));
        assert!(row.get::<_, bool>(8), "create_date is the UTC date of SentTimestamp");
        assert!(row.get::<_, bool>(9), "sent_at is the time the message was sent");
    }
    assert_eq!(null_locales, 29);

    let quarantine = db.query("SELECT reason, detail, masked_body FROM user_logins_quarantine", &[]).await.unwrap();
    assert_eq!(quarantine.len(), 1);
    assert_eq!(quarantine[0].get::<_, &str>(0), "missing_field");
    assert_eq!(quarantine[0].get::<_, Option<&str>>(1), Some("user_id"));
    assert!(quarantine[0].get::<_, &str>(2).contains("oops_wrong_msg_type"));

    env.assert_queue_empty().await;
    let tables = dump_tables(&db).await;
    assert!(logs.contains("queue drained"), "logs were captured: {logs}");
    for record in &valid {
        for field in ["ip", "device_id"] {
            let raw = record[field].as_str().unwrap();
            assert!(!tables.contains(raw), "raw {field} in the database");
            assert!(!logs.contains(raw), "raw {field} in the logs");
        }
    }
}

#[tokio::test]
async fn redelivered_messages_whose_rows_committed_are_not_written_twice() {
    let env = TestEnv::new().await;
    let sink = env.migrated_sink().await;
    env.publish(synthetic_bodies(200, 11)).await;

    // Play a run that committed half of the messages and died before deleting them.
    let mut received = Vec::new();
    while received.len() < 200 {
        let out = env
            .sqs
            .receive_message()
            .queue_url(&env.queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(2)
            .send()
            .await
            .unwrap();
        received.extend(out.messages.unwrap_or_default());
    }
    let masker = Masker::new(&SecretString::from(MASK_KEY));
    let committed: Vec<_> = received
        .iter()
        .filter_map(|m| {
            let login = decode(m.body()?).ok()?;
            Some(masker.mask_login(login, MessageMeta { message_id: m.message_id()?.to_owned(), sent_at: Utc::now() }))
        })
        .take(100)
        .collect();
    assert_eq!(committed.len(), 100);
    sink.write(&committed, &[], &Default::default()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;

    let summary = env.drain(&[]).await;
    assert_eq!(summary.received, 200);
    assert_eq!(summary.duplicates, 100, "the unique message id caught every redelivery");
    assert_eq!(summary.written, 98);

    let db = env.db().await;
    let row = db.query_one("SELECT count(*), count(DISTINCT message_id) FROM user_logins", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (198, 198));
    env.assert_queue_empty().await;

    // Writing a committed batch again is a no-op as well.
    let again = sink.write(&committed, &[], &Default::default()).await.unwrap();
    assert_eq!((again.written, again.already_stored), (0, 100));
}

#[tokio::test]
async fn a_drain_waits_for_delayed_messages_after_everything_held_is_deleted() {
    // The drain check runs the moment the last held message is deleted: the queue still counts
    // the delayed ones then, so the run must wait for them instead of exiting.
    let env = TestEnv::new().await;
    let mut sent = env.publish_with_ids(&synthetic_bodies(50, 21)).await;
    sent.extend(env.publish_delayed(&synthetic_bodies(20, 22), 3).await);

    let summary = env.drain(&[]).await;

    assert_eq!(summary.received, 70);
    assert_eq!(summary.deleted, 70);
    env.assert_exactly_once(&sent).await;
}

#[tokio::test]
async fn two_processes_on_one_queue_write_each_message_exactly_once() {
    let env = TestEnv::new().await;
    env.publish(synthetic_bodies(1000, 12)).await;

    let (a, b) = tokio::join!(env.drain(&["--pollers", "2"]), env.drain(&["--pollers", "2"]));

    assert_eq!(a.received + b.received, 1000 + a.duplicates + b.duplicates);
    assert_eq!(a.written + b.written, 990);
    assert_eq!(a.quarantined + b.quarantined, 10);
    let db = env.db().await;
    let row = db.query_one("SELECT count(*), count(DISTINCT message_id) FROM user_logins", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (990, 990));
    let quarantined: i64 = db.query_one("SELECT count(*) FROM user_logins_quarantine", &[]).await.unwrap().get(0);
    assert_eq!(quarantined, 10);
    env.assert_queue_empty().await;
}

#[tokio::test]
async fn a_row_the_database_rejects_is_quarantined_and_its_batch_still_written() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    // A rule the validator does not know: stands in for any row PostgreSQL refuses.
    env.db()
        .await
        .batch_execute("ALTER TABLE user_logins ADD CONSTRAINT no_marker CHECK (device_type <> 'db-rejects-this')")
        .await
        .unwrap();
    let mut bodies = synthetic_bodies(30, 13);
    let mut poisoned: Value = serde_json::from_str(&bodies[5]).unwrap();
    poisoned["device_type"] = json!("db-rejects-this");
    let poisoned_ip = poisoned["ip"].as_str().unwrap().to_owned();
    bodies[5] = poisoned.to_string();
    env.publish(bodies).await;

    // One poller and a long window: the poisoned row shares its batch with the others.
    let summary = env.drain(&["--pollers", "1", "--batch-max-wait-ms", "3000"]).await;
    assert_eq!((summary.written, summary.quarantined), (29, 1));

    let db = env.db().await;
    let rows: i64 = db.query_one("SELECT count(*) FROM user_logins", &[]).await.unwrap().get(0);
    assert_eq!(rows, 29);
    let q = db.query_one("SELECT reason, detail, masked_body FROM user_logins_quarantine", &[]).await.unwrap();
    assert_eq!(q.get::<_, &str>(0), "db_rejected");
    assert_eq!(q.get::<_, &str>(1), "23514", "the SQLSTATE of a check violation");
    assert!(q.get::<_, &str>(2).contains(&hmac_hex(&poisoned_ip)));
    assert!(!q.get::<_, &str>(2).contains(&poisoned_ip));
    env.assert_queue_empty().await;
}

#[tokio::test]
async fn migration_upgrades_a_table_made_from_the_reference_ddl_and_keeps_its_rows() {
    let env = TestEnv::new().await;
    env.db()
        .await
        .batch_execute(
            "CREATE TABLE user_logins(
                 user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
                 masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date);
             INSERT INTO user_logins VALUES ('legacy', 'ios', 'a', 'b', 'US', 230, '2020-01-01'),
                                            ('legacy-2', 'android', 'c', 'd', NULL, 96, '2020-01-02');",
        )
        .await
        .unwrap();
    env.publish(synthetic_bodies(20, 14)).await;

    let summary = env.drain(&[]).await;
    assert_eq!(summary.written, 20);
    env.migrated_sink().await; // running it again changes nothing

    let db = env.db().await;
    let legacy = db
        .query(
            "SELECT user_id, app_version, create_date::text FROM user_logins WHERE message_id IS NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let legacy: Vec<(String, i32, String)> = legacy.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        legacy,
        [("legacy".into(), 230, "2020-01-01".into()), ("legacy-2".into(), 96, "2020-01-02".into())],
        "rows from before the upgrade are untouched"
    );
    let total: i64 = db.query_one("SELECT count(*) FROM user_logins", &[]).await.unwrap().get(0);
    assert_eq!(total, 22);
}

#[tokio::test]
async fn migration_upgrades_a_database_made_by_each_earlier_schema_and_records_the_version() {
    for version in 0..=3 {
        let env = TestEnv::new().await;
        let path = format!("{}/tests/fixtures/schema_{version}.sql", env!("CARGO_MANIFEST_DIR"));
        let db = env.db().await;
        db.batch_execute(&std::fs::read_to_string(&path).unwrap()).await.unwrap();
        db.batch_execute(
            "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date, message_id)
             VALUES ('before-the-upgrade', 'ios', 'a', 'b', NULL, 10000000, '2020-01-01', 'old-1')",
        )
        .await
        .unwrap();
        env.publish(synthetic_bodies(20, 40 + version)).await;

        let summary = env.drain(&[]).await;
        assert_eq!(summary.written + summary.quarantined, 20, "schema {version}");
        env.migrated_sink().await; // running it again changes nothing

        let versions: Vec<i32> = db
            .query("SELECT version FROM refinery_schema_history ORDER BY version", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, [1], "schema {version}: the baseline recorded once");
        let old: i64 = db
            .query_one("SELECT count(*) FROM user_logins WHERE user_id = 'before-the-upgrade'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(old, 1, "schema {version}: its rows kept");
        let latest: i64 = db
            .query_one(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'user_logins_pii' AND column_name = 'user_fingerprints'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(latest, 1, "schema {version}: upgraded to the latest");
    }
}

#[tokio::test]
async fn hostile_bodies_are_quarantined_with_their_reasons_and_valid_ones_written() {
    let env = TestEnv::new().await;
    let good = json!({"user_id": "u-ok", "app_version": "2.3.0", "device_type": "ios", "ip": "10.20.30.40",
                      "locale": "US", "device_id": "123-45-6789"});
    let with = |field: &str, value: Value| {
        let mut v = good.clone();
        v[field] = value;
        v.to_string()
    };
    let cases: Vec<(String, Option<&str>)> = vec![
        ("   ".into(), Some("empty_body")),
        ("not json at all, 10.20.30.41".into(), Some("invalid_json")),
        (r#"{"ip":"10.20.30.42","device_id":"999-88-7777""#.into(), Some("invalid_json")),
        ("[1,2,3]".into(), Some("not_an_object")),
        ("null".into(), Some("not_an_object")),
        (with("user_id", Value::Null), Some("null_field")),
        (with("ip", json!(1234567)), Some("wrong_type")),
        (with("app_version", json!(2.3)), Some("wrong_type")),
        (with("device_type", json!("x".repeat(33))), Some("too_long")),
        (with("ip", json!("10.20.30.400")), Some("invalid_ip")),
        (with("app_version", json!("2.3.0-beta")), Some("invalid_app_version")),
        (with("locale", json!("a\u{0}b")), Some("invalid_character")),
        (json!({"nested": {"ip": "10.20.30.43", "device_id": "111-22-3333"}}).to_string(), Some("missing_field")),
        // Valid, though odd: IPv6, unicode and SQL-looking text, extra fields, a large body.
        (with("ip", json!("2001:db8::42")), None),
        (with("user_id", json!("ユーザー'); DROP TABLE user_logins;--")), None),
        (with("padding", json!("p".repeat(200_000))), None),
    ];
    let bodies: Vec<String> = cases.iter().map(|(body, _)| body.clone()).collect();
    let ids = env.send_each(&bodies).await;

    let summary = env.drain(&[]).await;
    assert_eq!(summary.written, 3);
    assert_eq!(summary.quarantined, 13);

    let db = env.db().await;
    let quarantine: HashMap<String, String> = db
        .query("SELECT message_id, reason FROM user_logins_quarantine", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let written: HashSet<String> =
        db.query("SELECT message_id FROM user_logins", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    for ((body, expected), id) in cases.iter().zip(&ids) {
        match expected {
            Some(reason) => assert_eq!(quarantine.get(id).map(String::as_str), Some(*reason), "body {body:.80}"),
            None => assert!(written.contains(id), "body {body:.80} was not written"),
        }
    }
    let sql_like: String =
        db.query_one("SELECT user_id FROM user_logins WHERE user_id LIKE 'ユーザー%'", &[]).await.unwrap().get(0);
    assert_eq!(sql_like, "ユーザー'); DROP TABLE user_logins;--");
    let tables = dump_tables(&db).await;
    for raw in ["10.20.30.4", "123-45-6789", "999-88-7777", "111-22-3333", "2001:db8::42", "1234567"] {
        assert!(!tables.contains(raw), "{raw} leaked into the database");
    }
    env.assert_queue_empty().await;
}

#[tokio::test]
async fn startup_refuses_a_short_mask_key_without_printing_it() {
    let env = TestEnv::new().await;
    let output = run_binary(&env, &["run", "--drain"], &[("MASK_KEY", "tooshort-secret")]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MASK_KEY") && stderr.contains("at least 32 bytes"), "{stderr}");
    assert!(!stderr.contains("tooshort-secret"), "the key was printed: {stderr}");

    let output = run_binary(&env, &["run", "--drain"], &[("BATCH_MAX_ROWS", "many")]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("BATCH_MAX_ROWS"));
}

#[tokio::test]
async fn a_drain_that_cannot_finish_stops_at_its_timeout_and_names_what_is_held() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    env.publish(synthetic_bodies(50, 9)).await;
    let mut locker = env.db().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let args = env.run_args(&["--drain-timeout-secs", "3", "--shutdown-grace-secs", "1"]);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        DRAIN_TIMEOUT,
        loginflow::run(args.settings().expect("test settings"), std::future::pending()),
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    lock.rollback().await.unwrap();
    let Err(err @ loginflow::RunError::DrainTimeout { held, .. }) = &result else { panic!("{result:?}") };
    assert_eq!(*held, 50, "every message is held by the blocked write");
    let message = err.to_string();
    assert!(message.contains("DRAIN_TIMEOUT_SECS") && message.contains("50 messages were still held"), "{message}");
    assert!(elapsed < std::time::Duration::from_secs(10), "took {elapsed:?}");
    // Nothing was deleted: a later drain stores all of them.
    let summary = env.drain(&[]).await;
    assert_eq!(summary.written + summary.quarantined, 50);
}

/// An SNS notification as SNS delivers it into a subscribed queue without raw message delivery.
fn sns_envelope(sns_id: &str, message: &str) -> String {
    json!({
        "Type": "Notification",
        "MessageId": sns_id,
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:logins",
        "Message": message,
        "Timestamp": "2026-11-24T10:00:00.000Z",
        "SignatureVersion": "1",
    })
    .to_string()
}

const SNS_VALID: &str = "0d7b8f52-3c1e-4f2a-9b6d-5e4c3b2a1f00";
const SNS_INVALID: &str = "0d7b8f52-3c1e-4f2a-9b6d-5e4c3b2a1f01";
const SNS_BROKEN: &str = "0d7b8f52-3c1e-4f2a-9b6d-5e4c3b2a1f02";

#[tokio::test]
async fn sns_envelopes_are_unwrapped_keyed_by_their_sns_id_and_broken_ones_quarantined() {
    let env = TestEnv::new().await;
    let valid = r#"{"user_id":"sns-user","app_version":"2.3.0","device_type":"ios","ip":"198.51.100.23","locale":"DE","device_id":"555-12-3456"}"#;
    let invalid = r#"{"user_id":"sns-user","device_type":"ios","ip":"198.51.100.24","device_id":"555-12-3457"}"#;
    // `Message` holding the event as an object, not as the string SNS sends.
    let broken = sns_envelope(SNS_BROKEN, valid).replace(&serde_json::to_string(valid).unwrap(), valid);
    let bodies = [
        sns_envelope(SNS_VALID, valid),
        // SNS delivers at least once: the same notification again, as a new SQS message.
        sns_envelope(SNS_VALID, valid),
        sns_envelope(SNS_INVALID, invalid),
        broken,
    ];
    let sqs_ids = env.send_each(&bodies).await;
    let summary = env.drain(&[]).await;
    assert_eq!((summary.written, summary.quarantined, summary.deleted), (1, 2, 4));

    let db = env.db().await;
    let rows = db.query("SELECT message_id, user_id, masked_ip FROM user_logins", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "one notification, one row, however often SNS delivered it");
    assert_eq!(rows[0].get::<_, &str>(0), format!("sns:{SNS_VALID}"));
    assert_eq!(rows[0].get::<_, &str>(1), "sns-user");
    assert_eq!(rows[0].get::<_, String>(2), hmac_hex("198.51.100.23"));
    let quarantine =
        db.query("SELECT message_id, reason, detail FROM user_logins_quarantine ORDER BY reason", &[]).await.unwrap();
    let found: Vec<(String, String, Option<String>)> =
        quarantine.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        found,
        [
            (sqs_ids[3].clone(), "invalid_envelope".to_owned(), Some("Message".to_owned())),
            (format!("sns:{SNS_INVALID}"), "missing_field".to_owned(), Some("app_version".to_owned())),
        ]
    );
    env.assert_queue_empty().await;
    let tables = dump_tables(&db).await;
    for raw in ["198.51.100.23", "198.51.100.24", "555-12-3456"] {
        assert!(!tables.contains(raw), "raw {raw} in the database");
    }
}

/// Ids come only in their issuer's shape: an SNS `MessageId` or a copy attribute holding an
/// address, or too long for an index row, is not an id, so the message is quarantined under its
/// SQS id; a raw event with a stray `TopicArn` is a raw event.
#[tokio::test]
async fn ids_a_sender_wrote_are_used_only_in_their_issuers_shape() {
    let env = TestEnv::new().await;
    let event = r#"{"user_id":"u-ids","app_version":"2.3.0","device_type":"ios","ip":"198.51.100.31","locale":"DE","device_id":"555-12-3499"}"#;
    let long_id = "7".repeat(3_000);
    let with_topic = event.replacen('{', r#"{"TopicArn":"arn:aws:sns:us-east-1:000000000000:logins","#, 1);
    let bodies = [sns_envelope("203.0.113.7", event), sns_envelope(&long_id, event), with_topic];
    let mut sqs_ids = env.send_each(&bodies).await;
    // Copies claiming to be of another message: an address, and a well-formed SQS id.
    let copy_of = |original: &str| {
        std::collections::HashMap::from([(
            loginflow::sqs::ORIGINAL_ID_ATTRIBUTE.to_owned(),
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(original)
                .build()
                .unwrap(),
        )])
    };
    let real_original = "6a1e0c44-7f3b-4d9a-8c2e-1b5d7f9e3a20";
    for original in ["198.51.100.99", real_original] {
        let sent = env
            .sqs
            .send_message()
            .queue_url(&env.queue_url)
            .message_body(event)
            .set_message_attributes(Some(copy_of(original)))
            .send()
            .await
            .unwrap();
        sqs_ids.push(sent.message_id.unwrap());
    }
    let (ok, _summary, logs) = {
        let output = run_binary(&env, &["run", "--drain"], &[("RUST_LOG", "debug")]).await;
        (output.status.success(), (), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    assert!(ok, "{logs}");
    let db = env.db().await;
    let stored: Vec<(String, Option<String>, Option<String>)> = db
        .query(
            "SELECT message_id, NULL, NULL FROM user_logins UNION ALL
             SELECT message_id, reason::text, detail FROM user_logins_quarantine ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut expected = vec![
        (sqs_ids[0].clone(), Some("invalid_envelope".to_owned()), Some("MessageId".to_owned())),
        (sqs_ids[1].clone(), Some("invalid_envelope".to_owned()), Some("MessageId".to_owned())),
        (sqs_ids[2].clone(), None, None),
        (
            sqs_ids[3].clone(),
            Some("invalid_envelope".to_owned()),
            Some(loginflow::sqs::ORIGINAL_ID_ATTRIBUTE.to_owned()),
        ),
        (real_original.to_owned(), None, None),
    ];
    expected.sort();
    assert_eq!(stored, expected);
    let tables = dump_tables(&db).await;
    for text in ["203.0.113.7", "198.51.100.99", "198.51.100.31", "555-12-3499"] {
        assert!(!tables.contains(text), "{text} in the database");
        assert!(!logs.contains(text), "{text} in the logs");
    }
    assert!(!logs.contains(&long_id[..100]), "the long MessageId in the logs");
    env.assert_queue_empty().await;
}

#[tokio::test]
async fn pii_hidden_anywhere_in_a_rejected_body_never_reaches_the_quarantine_table() {
    let env = TestEnv::new().await;
    // The bodies that leaked raw values into masked_body before quarantine scrubbed by shape.
    let bodies = [
        r#""{\"ip\":\"203.0.113.77\",\"device_id\":\"123-45-6789\"}""#.to_owned(),
        sns_envelope("sns-hidden", r#"{"ip":"203.0.113.78","device_id":"123-45-6780","user_id":"u"}"#)
            .replace("\"Type\":\"Notification\"", "\"Type\":\"SubscriptionConfirmation\""),
        r#"{"client_ip": "198.51.100.7", "deviceId": "555-66-7777"}"#.to_owned(),
        r#"{"note": "login from 192.0.2.99 device 777-88-9999"}"#.to_owned(),
        r#"["203.0.113.5", "999-00-1111"]"#.to_owned(),
        r#"ip=2001:db8::5 device=111-22-3334 (not json"#.to_owned(),
    ];
    env.send_each(&bodies).await;
    let summary = env.drain(&[]).await;
    assert_eq!(summary.quarantined, bodies.len() as u64);
    let tables = dump_tables(&env.db().await).await;
    for raw in [
        "203.0.113.77",
        "123-45-6789",
        "203.0.113.78",
        "123-45-6780",
        "198.51.100.7",
        "555-66-7777",
        "192.0.2.99",
        "777-88-9999",
        "203.0.113.5",
        "999-00-1111",
        "2001:db8::5",
        "111-22-3334",
    ] {
        assert!(!tables.contains(raw), "raw {raw} in the quarantine table:\n{tables}");
    }
    assert!(tables.contains(&hmac_hex("198.51.100.7")), "equal values keep equal masks");
}

/// The standard fan-out for real: a producer publishes to an SNS topic, SNS delivers envelopes
/// into the subscribed queue (no raw message delivery), loginflow unwraps and keys them.
#[tokio::test]
async fn records_published_to_a_subscribed_sns_topic_become_rows_keyed_by_their_sns_id() {
    let env = TestEnv::new().await;
    let sns =
        aws_sdk_sns::Client::new(&loginflow::sqs::sdk_config(&sqs_args(&env.endpoint, &env.queue_url).access()).await);
    let topic = sns.create_topic().name(format!("logins-{}", env.queue_url.rsplit('/').next().unwrap())).send().await;
    let topic_arn = topic.expect("create topic").topic_arn.expect("topic arn");
    let queue_arn = env
        .sqs
        .get_queue_attributes()
        .queue_url(&env.queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()
        .remove(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .unwrap();
    sns.subscribe().topic_arn(&topic_arn).protocol("sqs").endpoint(&queue_arn).send().await.expect("subscribe");

    let bodies = synthetic_bodies(20, 31);
    let mut sns_ids = Vec::new();
    for body in bodies.iter().chain(std::iter::once(&"{\"device_type\":\"ios\"}".to_owned())) {
        let published = sns.publish().topic_arn(&topic_arn).message(body).send().await.expect("publish");
        sns_ids.push(format!("sns:{}", published.message_id.expect("SNS message id")));
    }
    let summary = env.drain(&[]).await;
    assert_eq!(summary.received, 21, "every notification arrived as one SQS message");
    let stored = env.stored_ids().await;
    let expected: HashSet<&String> = sns_ids.iter().collect();
    assert_eq!(stored.keys().collect::<HashSet<_>>(), expected, "rows and quarantine keyed by SNS id");
    assert!(stored.values().all(|n| *n == 1));
    let db = env.db().await;
    let rows: i64 = db.query_one("SELECT count(*) FROM user_logins", &[]).await.unwrap().get(0);
    let reasons: Vec<String> =
        db.query("SELECT reason FROM user_logins_quarantine", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    // The generator's first 20 records are valid (its malformed one is the 58th); the 21st body is not.
    assert_eq!((rows, reasons), (20, vec!["missing_field".to_owned()]));
    env.assert_queue_empty().await;
}

/// The clear columns are stored as sent, so an address or a device id in one of them (a client
/// bug, or data smuggled past the mask) quarantines the record, naming the field, and the copy
/// kept is scrubbed like any quarantined body.
#[tokio::test]
async fn an_address_or_device_id_in_a_clear_field_quarantines_the_record_naming_the_field() {
    let env = TestEnv::new().await;
    let base = json!({"user_id":"u-clear","app_version":"2.3.0","device_type":"ios","ip":"198.51.100.40","locale":"DE","device_id":"555-12-3400"});
    let cases = [
        ("device_type", "10.0.0.77"),
        ("locale", "333-44-5557"),
        ("user_id", "login from 198.51.100.10 on 333-44-5555"),
        ("user_id", "fe80::1"),
        ("app_version", "10.0.0.78"),
        ("device_type", "ios 2001:db8::9"),
        ("locale", "203.0.113.9"),
        ("user_id", "u-::ffff:192.0.2.44"),
    ];
    let bodies: Vec<String> = cases
        .iter()
        .map(|(field, value)| {
            let mut body = base.clone();
            body[*field] = json!(value);
            body.to_string()
        })
        .collect();
    let ids = env.send_each(&bodies).await;
    let summary = env.drain(&[]).await;
    assert_eq!((summary.written, summary.quarantined), (0, cases.len() as u64), "{summary:?}");
    let db = env.db().await;
    for (id, (field, _)) in ids.iter().zip(cases) {
        let row = db
            .query_one("SELECT reason, detail FROM user_logins_quarantine WHERE message_id = $1", &[id])
            .await
            .unwrap();
        assert_eq!((row.get::<_, &str>(0), row.get::<_, Option<&str>>(1)), ("pii_in_field", Some(field)));
    }
    let tables = dump_tables(&db).await;
    for raw in [
        "10.0.0.77",
        "333-44-5557",
        "198.51.100.10",
        "333-44-5555",
        "fe80::1",
        "10.0.0.78",
        "2001:db8::9",
        "203.0.113.9",
        "192.0.2.44",
        "198.51.100.40",
        "555-12-3400",
    ] {
        assert!(!tables.contains(raw), "raw {raw} in the database");
    }
}

/// Messages a long poll brings after shutdown began are never processed: they are made visible
/// again at once, not left invisible until their visibility timeout.
#[tokio::test]
async fn messages_received_after_the_stop_began_are_visible_again_at_once() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let mut args = env.run_args(&["--receive-wait-secs", "20", "--visibility-timeout-secs", "300"]);
    args.drain = false;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(loginflow::run(args.settings().expect("test settings"), async move {
        let _ = stopped.await;
    }));
    // The pollers are in their long polls on the empty queue.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    stop.send(()).unwrap();
    let sent = env.send_each(&synthetic_bodies(5, 31)).await;
    let summary = tokio::time::timeout(std::time::Duration::from_secs(30), run).await.unwrap().unwrap().unwrap();
    assert_eq!(summary.written, 0, "nothing is processed after the stop");
    let depth = loginflow::sqs::queue_depth(&env.sqs, &env.queue_url).await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (sent.len() as u64, 0), "{depth:?}");
}

/// Row-level security refusing some rows shares SQLSTATE 42501 with a revoked privilege, but it is
/// those rows' fault: they are quarantined as `db_rejected` and the rest of their batch is written
/// (COPY cannot write such a table: the insert takes over).
#[tokio::test]
async fn rows_a_row_level_security_policy_refuses_cost_only_themselves() {
    let env = TestEnv::new().await;
    env.migrated_sink().await;
    let role = format!("lf_rls_{}", uuid::Uuid::new_v4().simple());
    env.db()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             ALTER TABLE user_logins ENABLE ROW LEVEL SECURITY;
             CREATE POLICY readable ON user_logins FOR SELECT USING (true);
             CREATE POLICY no_tablets ON user_logins FOR INSERT WITH CHECK (device_type <> 'tablet');"
        ))
        .await
        .unwrap();
    let mut bodies = synthetic_bodies(100, 41);
    for body in bodies.iter_mut().step_by(10) {
        *body = body.replace("\"android\"", "\"tablet\"").replace("\"ios\"", "\"tablet\"");
    }
    let tablets = bodies.iter().filter(|b| b.contains("\"tablet\"") && decode(b).is_ok()).count();
    assert!(tablets >= 5, "{tablets}");
    let sent = env.publish_with_ids(&bodies).await;
    let as_role = TestEnv {
        database_url: env.database_url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1),
        queue_url: env.queue_url.clone(),
        endpoint: env.endpoint.clone(),
        sqs: env.sqs.clone(),
    };
    let summary = as_role.drain(&[]).await;
    assert_eq!(summary.released, 0, "{summary:?}");
    let db = env.db().await;
    let rejected: i64 = db
        .query_one("SELECT count(*) FROM user_logins_quarantine WHERE reason = 'db_rejected' AND detail = '42501'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rejected as usize, tablets, "exactly the refused rows are db_rejected");
    env.assert_each_once(&sent, &[]).await;
}
