//! How many clients a job can have, and what that costs per client in the
//! two places that hold a whole round: the round's DynamoDB item (400 KB)
//! and the workflow's state, which carries the job and the round result
//! between tasks (Step Functions: 256 KiB).
//!
//! Per client, a round item holds its id in `expected_clients` and, once
//! its row is in, in `received`; a rejected client also holds its reason in
//! `rejections`; at close its id goes into the result's `accepted` or
//! `rejected` (the DynamoDB ledger stores the result's reasons once, in
//! `rejections`: see crates/aws/src/dynamo.rs). Ids are at most 64 bytes
//! (keys::check_id). Reasons are the only part whose size is ours to
//! choose, so they share a fixed budget per round: up to 192 clients get
//! the full [`bounded::REASON_BYTES`], larger rounds shorter reasons, never
//! under [`MIN_REASON_BYTES`]. At [`MAX_CLIENTS`] with 64-byte ids and every
//! client rejected, the closed item stays under 400 KB (a test in
//! fedstep-aws's dynamo.rs sizes it by DynamoDB's rules) and the job with
//! its worst result under 256 KiB (job.rs tests).

use crate::bounded;

/// The most clients one job may list.
pub const MAX_CLIENTS: usize = 1000;

/// All of one round's rejection reasons together, one copy.
pub const ROUND_REASONS_BYTES: usize = 96 * 1024;

/// The shortest a reason is cut to: the rule's name and a figure or two.
pub const MIN_REASON_BYTES: usize = 96;

/// Step Functions' limit on a state's input or output.
pub const STATE_BYTES: usize = 256 * 1024;

/// DynamoDB's limit on one item.
pub const ITEM_BYTES: usize = 400 * 1024;

/// The longest reason stored for one client of a round of `expected`
/// clients.
pub fn reason_bytes(expected: usize) -> usize {
    (ROUND_REASONS_BYTES / expected.max(1)).clamp(MIN_REASON_BYTES, bounded::REASON_BYTES)
}

/// `reason` as stored in a round of `expected` clients.
pub fn stored_reason(reason: &str, expected: usize) -> String {
    bounded::bound(reason, reason_bytes(expected))
}

/// The largest round result a job of `clients` clients can produce, as
/// JSON: every client rejected with a reason of full length, 32 metrics.
pub fn worst_result_json_bytes(clients: &[String]) -> usize {
    let reason = reason_bytes(clients.len());
    let per_client: usize = clients.iter().map(|c| c.len() + reason + 6).sum();
    // job id, keys, 32 metric names of up to 64 bytes with their numbers.
    const FIXED: usize = 2 * 1024 + 32 * (64 + 32);
    FIXED + per_client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_rounds_keep_whole_reasons_and_large_ones_share_the_budget() {
        assert_eq!(reason_bytes(0), bounded::REASON_BYTES);
        assert_eq!(reason_bytes(3), bounded::REASON_BYTES);
        assert_eq!(reason_bytes(192), bounded::REASON_BYTES);
        assert_eq!(reason_bytes(193), ROUND_REASONS_BYTES / 193);
        assert_eq!(reason_bytes(MAX_CLIENTS), 98);
        assert_eq!(reason_bytes(100_000), MIN_REASON_BYTES);
        let long = "x".repeat(2000);
        assert!(stored_reason(&long, MAX_CLIENTS).len() <= 98);
        assert_eq!(stored_reason("short", MAX_CLIENTS), "short");
    }
}
