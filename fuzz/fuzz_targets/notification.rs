//! The queue-message path on the client: an SQS body → the client's own
//! decoder (`crates/client/src/message.rs`: the size bound, the SNS
//! envelope, the schema check, the id and key checks). Must never panic;
//! what it accepts must satisfy every rule it claims to check, and must
//! decode again, equal, from its own encoding.
//!
//! The decoder's source file is compiled here directly (it needs only
//! fedstep-cloud and serde_json): depending on fedstep-client would build
//! the trainer (candle) and the AWS SDK under the sanitizer for one function.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/client/src/message.rs"]
mod message;

use fedstep_cloud::{bounded, keys};
use fedstep_cloud::records::{Notification, SCHEMA};
use libfuzzer_sys::fuzz_target;
use message::{decode, is_sha256_hex, Rejection, MAX_MESSAGE_BYTES, MAX_ROUND};

fuzz_target!(|data: &[u8]| {
    // SQS bodies are text: non-UTF-8 never reaches the decoder.
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let note = match decode(body) {
        Ok(note) => note,
        Err(Rejection::Malformed(why)) => {
            assert!(!why.is_empty());
            return;
        }
        Err(Rejection::NewerSchema(s)) => {
            assert!(s > SCHEMA, "newer schema {s} is not newer than {SCHEMA}");
            return;
        }
    };
    assert!(body.len() <= MAX_MESSAGE_BYTES);
    match &note {
        Notification::GlobalModelReady(m) => {
            assert_eq!(m.schema, SCHEMA);
            assert!(keys::check_id("job_id", &m.job_id).is_ok(), "{m:?}");
            assert!((1..=MAX_ROUND).contains(&m.round), "{m:?}");
            assert_eq!(m.model_key, keys::global_model(&m.job_id, m.round));
            assert!(is_sha256_hex(&m.checksum), "{m:?}");
            assert!(m.deadline > 0, "{m:?}");
        }
        Notification::TrainingComplete(m) => {
            assert!(keys::check_id("job_id", &m.job_id).is_ok(), "{m:?}");
            assert!(m.final_model_key.starts_with(&format!("jobs/{}/", m.job_id)));
            assert!(!m.final_model_key.contains(".."), "{m:?}");
        }
        Notification::JobFailed(m) => {
            assert!(keys::check_id("job_id", &m.job_id).is_ok(), "{m:?}");
            assert!((1..=MAX_ROUND).contains(&m.round), "{m:?}");
            // The text a client logs: bounded, no control characters.
            assert!(m.error.len() <= bounded::QUOTE_BYTES, "{m:?}");
            assert!(m.cause.len() <= bounded::FAILURE_BYTES, "{m:?}");
            assert!(!m.error.chars().chain(m.cause.chars()).any(char::is_control), "{m:?}");
        }
    }
    // What it accepted re-encodes to a message it accepts, equal.
    let text = serde_json::to_string(&note).unwrap();
    assert_eq!(decode(&text), Ok(note));
});
