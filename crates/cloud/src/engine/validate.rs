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
    check_client_and_job(&u.client_id, &u.job_id, u.round)
}

/// The ids of any row a client writes (update or phase row).
pub(super) fn check_client_and_job(
    client_id: &str,
    job_id: &str,
    round: u32,
) -> Result<(), String> {
    keys::check_id("client_id", client_id)
        .map_err(|e| bounded::reason(&format!("client_id: {e}")))?;
    keys::check_id("job_id", job_id).map_err(|e| bounded::reason(&format!("job_id: {e}")))?;
    if round == 0 {
        return Err("round: rounds are numbered from 1".into());
    }
    Ok(())
}

/// A row's schema version: none, or one this aggregator reads.
pub(super) fn check_schema(schema: Option<u32>) -> Result<(), String> {
    match schema.filter(|&s| s > SCHEMA) {
        Some(s) => Err(format!(
            "schema: row schema {s} is newer than this aggregator's {SCHEMA}"
        )),
        None => Ok(()),
    }
}

/// An `updates` row that passed every rule against the round it names.
/// [`CheckedUpdate::check`] is the only way to make one, so code that
/// holds one need not ask again. A row is checked where it enters the
/// engine: from the stream when it is counted, and from the ledger when the
/// aggregation reads it again. The second is not a repeat of the first: a
/// client may rewrite its row after it was counted, and the stream never
/// delivers the rewrite (crates/cloud/tests/engine/rewritten_rows.rs), so the row
/// read at aggregation is new input.
#[derive(Debug, Clone)]
pub(super) struct CheckedUpdate(UpdateRecord);

/// Why [`CheckedUpdate::check`] refused a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The row's client is not an expected client of the round it names.
    /// Such a row must not write into that round's item at all, not even a
    /// rejection: any client can name any job, and a round item is the
    /// participants' (issue #13).
    NotExpected(String),
    /// The row breaks the rule its reason names.
    BreaksRule(String),
}

impl Refusal {
    pub(super) fn into_reason(self) -> String {
        match self {
            Refusal::NotExpected(reason) | Refusal::BreaksRule(reason) => reason,
        }
    }
}

impl CheckedUpdate {
    /// Checks `u` against `row`, the round it names; every reason is
    /// bounded. Whether the client takes part comes first: the caller may
    /// record no other reason for a client that does not.
    pub(super) fn check(u: UpdateRecord, row: &RoundRecord) -> Result<CheckedUpdate, Refusal> {
        if !row.expected_clients.iter().any(|c| c == &u.client_id) {
            return Err(Refusal::NotExpected(bounded::reason(&format!(
                "client: `{}` is not an expected client of round {} of job `{}` (expected: {})",
                quote(&u.client_id),
                row.round,
                row.job_id,
                row.expected_clients.join(", ")
            ))));
        }
        base_round(&u, row).map_err(|r| Refusal::BreaksRule(bounded::reason(&r)))?;
        against_round(&u).map_err(|r| Refusal::BreaksRule(bounded::reason(&r)))?;
        Ok(CheckedUpdate(u))
    }

    pub(super) fn row(&self) -> &UpdateRecord {
        &self.0
    }

    pub(super) fn into_row(self) -> UpdateRecord {
        self.0
    }
}

/// The version the row says its client trained from: only an async round
/// takes an older one, and only within its max_staleness.
fn base_round(u: &UpdateRecord, row: &RoundRecord) -> Result<(), String> {
    let Some(base) = u.base_round.filter(|&b| b != u.round) else {
        return Ok(());
    };
    let Some(buffer) = row.buffer else {
        return Err(format!(
            "base_round: round {} of job `{}` is synchronous; an update must be trained from              that round's model (base_round {base})",
            u.round, u.job_id
        ));
    };
    if base == 0 || base > u.round {
        return Err(format!(
            "base_round: {base} is not a version before {} (versions are numbered from 1)",
            u.round
        ));
    }
    let staleness = u.round - base;
    if staleness > buffer.max_staleness {
        return Err(format!(
            "stale: trained from version {base}, {staleness} versions before {};              max_staleness is {}",
            u.round, buffer.max_staleness
        ));
    }
    Ok(())
}

fn against_round(u: &UpdateRecord) -> Result<(), String> {
    check_schema(u.schema)?;
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
    // A row carried from a version it was late for keeps its object
    // there (engine/carry.rs): any version from its base on is this
    // client's (base_round was checked first).
    let carried = u.base_round.is_some_and(|base| {
        (base..u.round).any(|k| u.model_key == keys::update(&u.job_id, k, &u.client_id))
    });
    if u.model_key != want && !carried {
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
            "checksum: `{}` is not a SHA-256 (64 lowercase hex digits)",
            quote(&u.checksum)
        ));
    }
    if let Some(c) = u
        .store_checksum
        .as_deref()
        .filter(|c| !is_store_checksum(c))
    {
        return Err(format!(
            "store_checksum: `{}` is not a store checksum (1 to {MAX_STORE_CHECKSUM_BYTES} bytes of base64, `-` and digits)",
            quote(c)
        ));
    }
    Ok(())
}

/// The longest store checksum a row may name (S3's SHA-256: 44 characters
/// of base64, and `-N` for an upload in parts).
const MAX_STORE_CHECKSUM_BYTES: usize = 64;

/// What a store checksum is made of: it is only ever compared, but it is
/// quoted in reasons and logs, so it must be short and plain.
fn is_store_checksum(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_STORE_CHECKSUM_BYTES
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round 1 of job `j` expecting client `c`, and a good row of `c`.
    fn round_and_row() -> (RoundRecord, UpdateRecord) {
        let round: RoundRecord = serde_json::from_value(serde_json::json!({
            "job_id": "j", "round": 1, "status": "OPEN", "expected_clients": ["c"],
            "min_clients": 1, "deadline": 0, "global_model_key": "k", "global_checksum": "x"
        }))
        .unwrap();
        let u: UpdateRecord = serde_json::from_value(serde_json::json!({
            "client_id": "c", "job_round": keys::job_round("j", 1), "job_id": "j", "round": 1,
            "model_key": keys::update("j", 1, "c"), "checksum": "a".repeat(64),
            "num_examples": 1, "bytes": 1, "trained_at": "t", "llm_type": "llama",
            "store_checksum": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=-3"
        }))
        .unwrap();
        assert!(CheckedUpdate::check(u.clone(), &round).is_ok());
        (round, u)
    }

    #[test]
    fn a_long_llm_type_is_refused_when_counted() {
        let (round, mut u) = round_and_row();
        u.llm_type = Some("x".repeat(100_000));
        let Err(Refusal::BreaksRule(reason)) = CheckedUpdate::check(u, &round) else {
            panic!("a long llm_type must break a rule")
        };
        assert!(reason.starts_with("llm_type:"), "{reason}");
        assert!(reason.len() <= bounded::REASON_BYTES);
    }

    #[test]
    fn a_store_checksum_must_be_short_and_plain() {
        let (round, mut u) = round_and_row();
        for bad in ["", "a b", "\u{202e}x", &"A".repeat(65)] {
            u.store_checksum = Some(bad.to_string());
            let Err(Refusal::BreaksRule(reason)) = CheckedUpdate::check(u.clone(), &round) else {
                panic!("store_checksum {bad:?} must break a rule")
            };
            assert!(reason.starts_with("store_checksum:"), "{reason}");
            assert!(reason.len() <= bounded::REASON_BYTES);
        }
    }
}
