//! The per-message rule, in one place for every path that stores a message (the pipeline's
//! dedup and mask stages, and `quarantine replay`): which key a message is stored under (the SNS
//! key rule), and what it becomes (decode + validate, mask, seal).

use crate::decode::{decode, Reason, Rejection};
use crate::masker::Masker;
use crate::records::{MaskedLogin, MessageMeta, QuarantineRecord, Record, Sealed};
use crate::source::envelope::{self, InputFormat, Unwrapped};
use crate::source::Envelope;
use crate::vault::DataKey;

/// A received message with its key settled: `envelope.ack.message_id` is the key it is stored
/// under, and `unwrapped` what [`envelope::unwrap`] made of its body (never printed: it holds
/// the raw event).
pub struct Opened {
    pub envelope: Envelope,
    pub unwrapped: Result<Unwrapped, Rejection>,
}

/// Opens a received message per `format`. A message carrying a forged copy id is refused as
/// `invalid_envelope` (under its SQS id); an SNS notification is keyed by its SNS id ([`storage_key`]).
pub fn open(mut envelope: Envelope, format: InputFormat) -> Opened {
    let unwrapped = match envelope.forged_copy_id {
        true => Err(Rejection {
            reason: Reason::InvalidEnvelope,
            detail: Some(crate::sqs::ORIGINAL_ID_ATTRIBUTE.to_owned()),
        }),
        false => envelope::unwrap(&envelope.body, format),
    };
    if let Some(key) = storage_key(&unwrapped) {
        envelope.ack.message_id = key.to_owned();
    }
    Opened { envelope, unwrapped }
}

/// The key a message is stored under when it is not its SQS id: an SNS notification's
/// (`sns:` + its `MessageId`), so the same notification delivered twice is one row.
pub fn storage_key(unwrapped: &Result<Unwrapped, Rejection>) -> Option<&str> {
    match unwrapped {
        Ok(Unwrapped::Sns { key, .. }) => Some(key),
        _ => None,
    }
}

/// Decode + validate, mask and seal one message. `received` is the body as it arrived,
/// `unwrapped` what [`envelope::unwrap`] made of it; a rejected message's sealed copy is the
/// whole body as received (envelope included), so nothing is lost.
pub fn to_record(
    masker: &Masker,
    key: Option<&DataKey>,
    meta: MessageMeta,
    received: &str,
    unwrapped: &Result<Unwrapped, Rejection>,
) -> Record {
    let event = envelope::event(received, unwrapped);
    let decoded = match unwrapped {
        Ok(_) => decode(event),
        Err(rejection) => Err(rejection.clone()),
    };
    match decoded {
        Ok(login) => {
            let sealed = key.map(|key| key.seal_login(&meta.message_id, &login));
            Record::Login(MaskedLogin { sealed, ..masker.mask_login(login, meta) })
        }
        Err(rejection) => {
            let sealed = key.map(|key| Sealed {
                user_fingerprints: masker.user_fingerprints(received),
                ..key.seal_body(&meta.message_id, received)
            });
            Record::Quarantine(QuarantineRecord { sealed, ..masker.quarantine(rejection, event, meta) })
        }
    }
}
