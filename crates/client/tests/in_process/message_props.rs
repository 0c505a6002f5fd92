//! Fixed-iteration property tests of the client's message decoder (CI's
//! stand-in for fuzz/fuzz_targets/notification.rs, which runs the same
//! decoder under libFuzzer outside CI): it never panics, and it accepts a
//! `global_model_ready` exactly when every rule it checks holds.

use fedstep_client::message::{decode, is_sha256_hex, Rejection, MAX_ROUND};
use fedstep_cloud::keys;
use fedstep_cloud::records::{Notification, SCHEMA};
use proptest::prelude::*;
use serde_json::json;

/// What the decoder must decide, computed independently of it.
fn acceptable(job_id: &str, round: u32, model_key: &str, checksum: &str, deadline: i64) -> bool {
    keys::check_id("job_id", job_id).is_ok()
        && (1..=MAX_ROUND).contains(&round)
        && model_key == keys::global_model(job_id, round)
        && checksum.len() == 64
        && checksum
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && deadline > 0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn never_panics_on_any_text(body in any::<String>()) {
        if let Ok(note) = decode(&body) {
            // Whatever got through re-encodes to a message accepted equal.
            let text = serde_json::to_string(&note).unwrap();
            prop_assert_eq!(decode(&text), Ok(note));
        }
    }

    #[test]
    fn accepts_exactly_the_well_formed_announcements(
        job_id in "[A-Za-z0-9._/-]{0,70}",
        round in prop_oneof![Just(0u32), 1..=3u32, any::<u32>()],
        right_key in any::<bool>(),
        other_key in "[a-z0-9/._]{0,60}",
        checksum in prop_oneof!["[0-9a-f]{64}", "[0-9a-fA-F]{62,66}"],
        deadline in prop_oneof![Just(0i64), any::<i64>(), 1i64..=4_000_000_000],
        enveloped in any::<bool>(),
    ) {
        let model_key = if right_key { keys::global_model(&job_id, round) } else { other_key };
        let note = json!({"type": "global_model_ready", "schema": SCHEMA, "job_id": job_id,
                          "round": round, "model_key": model_key, "checksum": checksum,
                          "deadline": deadline});
        let body = if enveloped {
            json!({"Type": "Notification", "TopicArn": "arn:aws:sns:x", "Message": note.to_string()})
                .to_string()
        } else {
            note.to_string()
        };
        let want = acceptable(&job_id, round, &model_key, &checksum, deadline);
        match decode(&body) {
            Ok(Notification::GlobalModelReady(m)) => {
                prop_assert!(want, "accepted {m:?}");
                prop_assert_eq!(m.model_key, model_key);
                prop_assert!(is_sha256_hex(&m.checksum));
            }
            Ok(other) => prop_assert!(false, "decoded as {other:?}"),
            Err(Rejection::Malformed(why)) => prop_assert!(!want, "refused a good one: {why}"),
            Err(Rejection::NewerSchema(s)) => prop_assert!(false, "schema {s}"),
        }
    }

    #[test]
    fn random_edits_of_a_good_message_never_panic(
        edits in proptest::collection::vec(("[a-z_]{1,12}", any::<Option<i64>>(), "\\PC{0,20}"), 0..4),
    ) {
        let mut v = json!({"type": "global_model_ready", "schema": SCHEMA, "job_id": "j1", "round": 2,
                           "model_key": "jobs/j1/rounds/2/global.safetensors",
                           "checksum": "a".repeat(64), "deadline": 1_800_000_000_i64});
        for (field, number, text) in edits {
            v[field.as_str()] = match number { Some(n) => json!(n), None => json!(text) };
        }
        let _ = decode(&v.to_string());
    }
}
