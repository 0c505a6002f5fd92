//! The rules an `updates` row must pass before it counts. Rows are written
//! by clients and arrive through the stream: untrusted. Every reason starts
//! with the name of the rule it breaks, quotes client values bounded and is
//! itself bounded (`crate::bounded`), so it can be stored and logged as is.

use crate::bounded::{self, quote};
use crate::checksum::is_sha256_hex;
use crate::keys;
use crate::records::{RoundRecord, UpdateRecord, SCHEMA};

/// The longest `llm_type` a row may name (types are short words).
pub(super) const MAX_LLM_TYPE_BYTES: usize = 64;

/// Checks that need no lookup. Failing these, the row cannot even be
/// attributed to a round, so the rejection is not recorded anywhere.
pub(super) fn check_ids(u: &UpdateRecord) -> Result<(), String> {
    keys::check_id("client_id", &u.client_id)
        .map_err(|e| bounded::reason(&format!("client_id: {e}")))?;
    keys::check_id("job_id", &u.job_id).map_err(|e| bounded::reason(&format!("job_id: {e}")))?;
    if u.round == 0 {
        return Err("round: rounds are numbered from 1".into());
    }
    Ok(())
}

/// Whether the row's client takes part in the round it names. A row
/// failing this must not write into that round's item at all, not even a
/// rejection: any client can name any job, and a round item is the
/// participants' (issue #13).
pub(super) fn check_expected(u: &UpdateRecord, row: &RoundRecord) -> Result<(), String> {
    if row.expected_clients.iter().any(|c| c == &u.client_id) {
        return Ok(());
    }
    Err(bounded::reason(&format!(
        "client: `{}` is not an expected client of round {} of job `{}` (expected: {})",
        quote(&u.client_id),
        row.round,
        row.job_id,
        row.expected_clients.join(", ")
    )))
}

/// Checks against the round the row names (which exists and is OPEN).
pub(super) fn check_against_round(u: &UpdateRecord, row: &RoundRecord) -> Result<(), String> {
    against_round(u, row).map_err(|r| bounded::reason(&r))
}

fn against_round(u: &UpdateRecord, row: &RoundRecord) -> Result<(), String> {
    if let Some(s) = u.schema.filter(|&s| s > SCHEMA) {
        return Err(format!(
            "schema: row schema {s} is newer than this aggregator's {SCHEMA}"
        ));
    }
    check_expected(u, row)?;
    let want = keys::job_round(&u.job_id, u.round);
    if u.job_round != want {
        return Err(format!(
            "job_round: `{}` does not match job `{}` round {} (expected `{want}`)",
            quote(&u.job_round),
            u.job_id,
            u.round
        ));
    }
    let want = keys::update(&u.job_id, u.round, &u.client_id);
    if u.model_key != want {
        return Err(format!(
            "model_key: `{}` is not this client's update key `{want}`",
            quote(&u.model_key)
        ));
    }
    if let Some(t) = u
        .llm_type
        .as_deref()
        .filter(|t| t.len() > MAX_LLM_TYPE_BYTES)
    {
        // It names the final artifact's type and keys an index (DynamoDB:
        // 2 KB at most), so a long one could fail a job's Finalize.
        return Err(format!(
            "llm_type: `{}` is {} bytes, more than {MAX_LLM_TYPE_BYTES}",
            quote(t),
            t.len()
        ));
    }
    if !is_sha256_hex(&u.checksum) {
        return Err(format!(
            "checksum: `{}` is not a SHA-256 (64 hex digits)",
            quote(&u.checksum)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_llm_type_is_refused_when_counted() {
        let round: RoundRecord = serde_json::from_value(serde_json::json!({
            "job_id": "j", "round": 1, "status": "OPEN", "expected_clients": ["c"],
            "min_clients": 1, "deadline": 0, "global_model_key": "k", "global_checksum": "x"
        }))
        .unwrap();
        let mut u: UpdateRecord = serde_json::from_value(serde_json::json!({
            "client_id": "c", "job_round": keys::job_round("j", 1), "job_id": "j", "round": 1,
            "model_key": keys::update("j", 1, "c"), "checksum": "a".repeat(64),
            "num_examples": 1, "bytes": 1, "trained_at": "t", "llm_type": "llama"
        }))
        .unwrap();
        assert_eq!(check_against_round(&u, &round), Ok(()));
        u.llm_type = Some("x".repeat(100_000));
        let reason = check_against_round(&u, &round).unwrap_err();
        assert!(reason.starts_with("llm_type:"), "{reason}");
        assert!(reason.len() <= bounded::REASON_BYTES);
    }
}
