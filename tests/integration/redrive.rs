//! `loginflow redrive` against LocalStack: dead letters go back to the queue and are then
//! stored exactly once, by the move task and by the receive-send-delete copy.

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use loginflow::sqs::ORIGINAL_ID_ATTRIBUTE;
use serde_json::Value;

use crate::helpers::*;

/// Sends `bodies` straight into the environment's dead-letter queue; returns their ids.
async fn dead_letter(env: &TestEnv, bodies: &[String]) -> Vec<String> {
    let dlq = env.dlq_url().await;
    let mut ids = Vec::new();
    for chunk in bodies.chunks(10) {
        let entries = chunk.iter().enumerate().map(|(i, body)| {
            SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(body).build().unwrap()
        });
        let out =
            env.sqs.send_message_batch().queue_url(&dlq).set_entries(Some(entries.collect())).send().await.unwrap();
        assert!(out.failed.is_empty());
        ids.extend(out.successful.into_iter().map(|ok| ok.message_id));
    }
    ids
}

async fn redrive(env: &TestEnv, extra: &[&str]) -> Value {
    let mut args = vec!["redrive"];
    args.extend_from_slice(extra);
    let out = run_binary(env, &args, &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redrive failed: {stderr}");
    assert!(stderr.contains("redrive:"), "a progress line: {stderr}");
    serde_json::from_slice(&out.stdout).expect("redrive prints a JSON report")
}

#[tokio::test]
async fn redrive_moves_dead_letters_back_with_the_move_task_and_each_is_stored_once() {
    let env = TestEnv::new().await;
    let mut bodies = synthetic_bodies(30, 11);
    bodies.push("{not json".into());
    let ids = dead_letter(&env, &bodies).await;

    let report = redrive(&env, &[]).await;
    assert_eq!(report["method"], "move_task");
    assert_eq!(report["moved"], 31);
    assert!(env.take_dead_letters().await.is_empty(), "the dead-letter queue is empty");

    let summary = env.drain(&[]).await;
    assert_eq!((summary.written, summary.quarantined), (30, 1));
    env.assert_exactly_once(&ids).await;
}

#[tokio::test]
async fn copy_redrive_keeps_the_original_id_so_a_copy_sent_twice_is_stored_once() {
    let env = TestEnv::new().await;
    let bodies = synthetic_bodies(25, 12);
    let ids = dead_letter(&env, &bodies).await;

    let report = redrive(&env, &["--method", "copy"]).await;
    assert_eq!(
        (report["method"].as_str(), report["moved"].as_u64(), report["failed"].as_u64()),
        (Some("copy"), Some(25), Some(0))
    );
    assert!(env.take_dead_letters().await.is_empty());

    // A crash between the send and the delete leaves a second copy of a message: it carries
    // the same original id, so it is not stored twice.
    let twice = MessageAttributeValue::builder().data_type("String").string_value(&ids[0]).build().unwrap();
    env.sqs
        .send_message()
        .queue_url(&env.queue_url)
        .message_body(&bodies[0])
        .message_attributes(ORIGINAL_ID_ATTRIBUTE, twice)
        .send()
        .await
        .unwrap();

    let summary = env.drain(&[]).await;
    assert_eq!(summary.received, 26);
    assert_eq!(summary.written, 25);
    env.assert_exactly_once(&ids).await; // rows under the dead letters' own ids, each once
}

#[tokio::test]
async fn redrive_without_a_dead_letter_queue_says_what_to_pass() {
    let env = TestEnv::new().await;
    let bare = env
        .sqs
        .create_queue()
        .queue_name(format!("{}-bare", env.queue_url.rsplit('/').next().unwrap()))
        .send()
        .await
        .unwrap();
    let out = run_binary(&env, &["redrive"], &[("QUEUE_URL", bare.queue_url().unwrap())]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--dlq-url"), "{stderr}");
}

#[tokio::test]
async fn a_fifo_queue_drains_exactly_once_and_its_dead_letters_come_back() {
    let base = TestEnv::new().await;
    let name = format!("{}.fifo", base.queue_url.rsplit('/').next().unwrap());
    let queue_url = loginflow::commands::seed::ensure_queue(&base.sqs, &name, 5).await.expect("create a FIFO queue");
    let env = TestEnv {
        queue_url,
        database_url: base.database_url.clone(),
        endpoint: base.endpoint.clone(),
        sqs: base.sqs.clone(),
    };
    let dlq = env.dlq_url().await;
    assert!(dlq.ends_with("-dlq.fifo"), "{dlq}");

    let seeded = run_binary(&env, &["seed", "--count", "200"], &[]).await;
    assert!(seeded.status.success(), "seed: {}", String::from_utf8_lossy(&seeded.stderr));
    let summary = env.drain(&[]).await;
    assert_eq!((summary.written, summary.quarantined, summary.deleted), (198, 2, 200));

    // A run that stops cancels its pollers' long polls; the emulator still completes such a
    // poll (up to RECEIVE_WAIT_SECS = 1 here), and a message arriving meanwhile would stay
    // invisible for the visibility timeout. Let those polls expire first.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    // Dead letters of a FIFO queue keep their group when copied back.
    let entries = synthetic_bodies(5, 13).into_iter().enumerate().map(|(i, body)| {
        SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_body(body)
            .message_group_id("user-7")
            .message_deduplication_id(format!("dead-{i}"))
            .build()
            .unwrap()
    });
    env.sqs.send_message_batch().queue_url(&dlq).set_entries(Some(entries.collect())).send().await.unwrap();
    let report = redrive(&env, &["--method", "copy"]).await;
    assert_eq!(report["moved"], 5);
    let summary = env.drain(&[]).await;
    assert_eq!(summary.written, 5);
    let stored = env.stored_ids().await;
    assert_eq!(stored.len(), 205);
    assert!(stored.values().all(|n| *n == 1));
    env.assert_queue_empty().await;
}
