//! The S3 key layout (docs/design.md §2). Keys are deterministic so every step is
//! safe to retry: writing the same object twice writes the same key.

use crate::records::SecurePhase;

pub fn global_model(job_id: &str, round: u32) -> String {
    format!("jobs/{job_id}/rounds/{round}/global.safetensors")
}

/// How round `round`'s global model was made: the measurements of the
/// aggregation of round `round - 1`, beside the model it wrote (the same
/// folder as that model and its server state, which also belong to the
/// round they start). Round 1 has none: its model is the initial one.
pub fn round_measurements(job_id: &str, round: u32) -> String {
    format!("jobs/{job_id}/rounds/{round}/measurements.json")
}

pub fn update(job_id: &str, round: u32, client_id: &str) -> String {
    format!("jobs/{job_id}/rounds/{round}/updates/{client_id}.safetensors")
}

pub fn server_state(job_id: &str, round: u32) -> String {
    format!("jobs/{job_id}/rounds/{round}/server_state.safetensors")
}

/// SCAFFOLD's server control variate c for round `round` (issue #19):
/// what the clients of that round read beside the global model, and the
/// server's state for the next update of c.
pub fn server_variate(job_id: &str, round: u32) -> String {
    format!("jobs/{job_id}/rounds/{round}/scaffold_variate.safetensors")
}

/// A SCAFFOLD client's Δc_i for round `round`, beside its update.
pub fn variate_delta(job_id: &str, round: u32, client_id: &str) -> String {
    format!("jobs/{job_id}/rounds/{round}/updates/{client_id}.scaffold_delta.safetensors")
}

/// The folder of one attempt at aggregating round `round` (issue #14):
/// the plan, each shard's statistics and receipts, the decision. Kept
/// beside the round's objects, where clients cannot read (the decision
/// holds the DP noise key), never in the workflow's history.
pub fn attempt_dir(job_id: &str, round: u32, attempt: &str) -> String {
    format!("jobs/{job_id}/rounds/{round}/attempts/{attempt}")
}

/// Secure rounds (issue #18): a client's masked input for round `round`,
/// the phase-3 vector as integers (`fedstep_secagg::masked_file`).
pub fn masked_input(job_id: &str, round: u32, client_id: &str) -> String {
    format!("jobs/{job_id}/rounds/{round}/secagg/masked/{client_id}.safetensors")
}

/// The roster phase 1 closed with (every survivor's public keys): what
/// every client reads when share_keys opens.
pub fn secure_roster(job_id: &str, round: u32) -> String {
    format!("jobs/{job_id}/rounds/{round}/secagg/roster.json")
}

/// What the aggregator tells `client_id` alone when `phase` opens: its
/// forwarded shares (masked_input; sealed, so only it can open them) or the
/// shares it is to reveal (unmask).
pub fn secure_inbox(job_id: &str, round: u32, phase: SecurePhase, client_id: &str) -> String {
    format!("jobs/{job_id}/rounds/{round}/secagg/{phase}/{client_id}.json")
}

/// The messages phase `phase` took when it closed, and (masked_input) the
/// masked inputs as checked: named by the SHA-256 of the document, so two
/// steps that took different rows never write the same key, and the round
/// row names the one its close kept. Server-written, beside the attempts.
pub fn secure_taken(job_id: &str, round: u32, phase: SecurePhase, sha256: &str) -> String {
    format!("jobs/{job_id}/rounds/{round}/secagg/taken/{phase}-{sha256}.json")
}

/// The masks the last phase recovered (seeds, not secrets of any client
/// in the sum), for the tasks that sum the masked inputs. Beside the
/// attempts, where clients cannot read.
pub fn recovered_masks(job_id: &str, round: u32) -> String {
    format!("jobs/{job_id}/rounds/{round}/secagg/recovered_masks.json")
}

/// A secure round's row of `phase` in the `updates` table: its sort key,
/// `{job_id}#{round:06}#{phase}`, beside the client's update rows.
pub fn secure_job_round(job_id: &str, round: u32, phase: SecurePhase) -> String {
    format!("{}#{phase}", job_round(job_id, round))
}

/// The `updates` table's sort key: `{job_id}#{round:06}`.
pub fn job_round(job_id: &str, round: u32) -> String {
    format!("{job_id}#{round:06}")
}

/// Ids are used in keys, table keys and queue names: keep them to a safe
/// alphabet so no id can escape its prefix (`../`, `#`, `/`).
pub fn check_id(kind: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        // `id` may be anything a client wrote: quote it bounded.
        Err(format!(
            "{kind} `{}` must be 1–64 characters of A–Z a–z 0–9 - _ . and not start with a dot",
            crate::bounded::quote(id)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_id_rules() {
        assert_eq!(global_model("j", 2), "jobs/j/rounds/2/global.safetensors");
        assert_eq!(
            update("j", 2, "site-a"),
            "jobs/j/rounds/2/updates/site-a.safetensors"
        );
        assert_eq!(
            round_measurements("j", 3),
            "jobs/j/rounds/3/measurements.json"
        );
        assert_eq!(job_round("j", 7), "j#000007");
        assert!(check_id("client", "site-a").is_ok());
        for bad in ["", "../x", "a/b", "a#b", ".hidden", &"x".repeat(65)] {
            assert!(check_id("client", bad).is_err(), "{bad}");
        }
    }
}
