//! The queue-message path on the client: bytes → `Notification`. Must
//! never panic; a decoded message re-encodes to one that decodes equal.
//!
//! Retarget later: the client's own decoder (`fedstep_client::message::decode`,
//! which adds the size bound, the SNS envelope and the key checks) once
//! crates/client has landed.
#![no_main]

use fedstep_cloud::records::Notification;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(note) = serde_json::from_slice::<Notification>(data) else {
        return;
    };
    let text = serde_json::to_string(&note).unwrap();
    let again: Notification = serde_json::from_str(&text).unwrap();
    // NaN-free by construction (JSON has no NaN), so PartialEq is exact.
    assert_eq!(again, note);
    let _ = note.job_id();
});
