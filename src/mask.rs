//! Mask stage: each receive batch's fresh messages become records (decode + validate, mask,
//! seal: [`crate::transform::to_record`]), `MASK_CONCURRENCY` batches at a time. A batch whose
//! bodies are large (milliseconds each to scrub and seal) runs on a blocking thread, so the
//! pollers, visibility extension and database connections keep running meanwhile; the rest run
//! where they are polled, with no hand-off per batch.

use std::sync::Arc;

use futures::{stream, Stream, StreamExt};

use crate::dedup::{Fingerprint, Keyed};
use crate::masker::Masker;
use crate::records::{MessageMeta, Record};
use crate::source::{Ack, Budget, InFlight, Share};
use crate::transform::to_record;
use crate::vault::Vault;

/// A receive batch with more bytes of bodies than this is processed on a blocking thread.
const LARGE_BATCH_BYTES: usize = 256 << 10;

/// One message on its way to the sink.
#[derive(Debug)]
pub struct Item {
    pub ack: Ack,
    pub fingerprint: Fingerprint,
    pub record: Record,
    /// The body's share of the byte budget, held until the message leaves the pipeline.
    pub share: Option<Share>,
}

/// What the mask stage masks and seals with.
pub struct Masking {
    pub masker: Masker,
    /// The PII vault, when `PII_KMS_KEY_ID` is set.
    pub vault: Option<Arc<Vault>>,
}

impl Masking {
    /// Turns one keyed batch into items, in order (no I/O).
    pub fn process(&self, batch: Vec<Keyed>) -> Vec<Item> {
        let key = self.vault.as_ref().map(|vault| vault.current());
        batch
            .into_iter()
            .map(|keyed| {
                let envelope = keyed.opened.envelope;
                let record = match keyed.duplicate {
                    true => Record::Duplicate,
                    false => {
                        let meta =
                            MessageMeta { message_id: envelope.ack.message_id.clone(), sent_at: envelope.sent_at };
                        to_record(&self.masker, key.as_deref(), meta, &envelope.body, &keyed.opened.unwrapped)
                    }
                };
                Item { ack: envelope.ack, fingerprint: keyed.fingerprint, record, share: envelope.share }
            })
            .collect()
    }
}

/// The mask stage: `concurrency` batches at once, in order. A batch whose processing panicked
/// (a bug, not bad data) is left for redelivery (and, at last, the DLQ): released from the
/// in-flight registry, so its visibility is no longer extended.
pub fn stage(
    fresh: impl Stream<Item = Vec<Keyed>>,
    masking: Arc<Masking>,
    budget: Budget,
    in_flight: Arc<InFlight>,
    concurrency: usize,
) -> impl Stream<Item = Item> {
    fresh
        .map(move |batch| process_batch(masking.clone(), batch, budget.clone(), in_flight.clone()))
        .buffered(concurrency)
        .flat_map(stream::iter)
}

async fn process_batch(
    masking: Arc<Masking>,
    batch: Vec<Keyed>,
    budget: Budget,
    in_flight: Arc<InFlight>,
) -> Vec<Item> {
    let receipts: Vec<Arc<str>> = batch.iter().map(|k| k.opened.envelope.ack.receipt_handle.clone()).collect();
    let large = batch.iter().map(|k| k.opened.envelope.body.len()).sum::<usize>() > LARGE_BATCH_BYTES;
    let processed = match large {
        true => tokio::task::spawn_blocking(move || masking.process(batch)).await.map_err(|_| ()),
        false => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| masking.process(batch))).map_err(|_| ()),
    };
    let Ok(mut items) = processed else {
        in_flight.give_up_after_panic("masking", &receipts);
        return Vec::new();
    };
    count_what_was_made(&budget, &mut items);
    items
}

/// Refits the budget shares of a batch with quarantined messages to what those became: the
/// clear copy and the sealed original, held until the window is done, where the body was.
/// (A login becomes a few hundred bytes, less than its body: its share stays as it is.)
fn count_what_was_made(budget: &Budget, items: &mut [Item]) {
    if !items.iter().any(|item| matches!(item.record, Record::Quarantine(_))) {
        return;
    }
    let mut shares = Vec::new();
    let mut needs = Vec::new();
    let mut holders = Vec::new();
    for item in items.iter_mut() {
        let Some(share) = item.share.take() else { continue };
        needs.push(match &item.record {
            Record::Quarantine(record) => record.footprint(),
            _ => share.bytes(),
        });
        shares.push(share);
        holders.push(item);
    }
    let refitted = budget.refit(shares, &needs);
    for (item, share) in holders.into_iter().zip(refitted) {
        item.share = Some(share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::Dedup;
    use crate::source::envelope::InputFormat;
    use crate::source::Envelope;
    use crate::summary::Stats;
    use chrono::Utc;

    fn envelope(id: &str, body: &str) -> Envelope {
        Envelope {
            ack: Ack { message_id: id.into(), receipt_handle: format!("r-{id}").into() },
            body: body.into(),
            sent_at: Utc::now(),
            share: None,
            forged_copy_id: false,
        }
    }

    const VALID: &str =
        r#"{"user_id":"u","app_version":"1.0","device_type":"ios","ip":"1.2.3.4","locale":null,"device_id":"1"}"#;

    #[tokio::test]
    async fn dedup_then_mask_sorts_messages_into_rows_quarantine_and_duplicates_in_order() {
        let dedup = Dedup::new(100, std::time::Duration::from_secs(60));
        dedup.mark_committed([Dedup::fingerprint("m-3")]);
        let batch = vec![envelope("m-1", VALID), envelope("m-2", "{oops"), envelope("m-3", VALID)];
        let stats = Arc::new(Stats::default());
        let fresh = crate::dedup::drop_committed(
            stream::iter([batch]),
            dedup,
            InputFormat::Auto,
            Arc::default(),
            stats.clone(),
        );
        let masking = Masking { masker: Masker::new(&secrecy::SecretString::from("k".repeat(32))), vault: None };
        let items: Vec<Item> =
            stage(fresh, Arc::new(masking), Budget::new(64 << 20), Arc::default(), 2).collect().await;

        let kinds: Vec<(&str, &str)> = items
            .iter()
            .map(|item| {
                let kind = match &item.record {
                    Record::Login(_) => "login",
                    Record::Quarantine(q) => q.reason.as_str(),
                    Record::Duplicate => "duplicate",
                };
                (item.ack.message_id.as_str(), kind)
            })
            .collect();
        assert_eq!(kinds, [("m-1", "login"), ("m-2", "invalid_json"), ("m-3", "duplicate")]);
        let summary = stats.summary();
        assert_eq!((summary.received, summary.duplicates), (3, 1));
    }
}
