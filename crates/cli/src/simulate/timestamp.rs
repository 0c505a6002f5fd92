//! The simulator's timestamps: the default run directory name and the
//! `trained_at` of the simulated clients' rows, both from the ledger's own
//! RFC 3339 formatter so there is one calendar implementation.

use fedstep_cloud::ports::{Clock, SystemClock};
use fedstep_cloud::timefmt::rfc3339_utc;

/// `simulate-20261121-234501`.
pub fn run_dir_name() -> String {
    // 2026-11-21T23:45:01Z → 20261121-234501
    let t = rfc3339_utc(SystemClock.now());
    let compact: String = t
        .trim_end_matches('Z')
        .replace(['-', ':'], "")
        .replace('T', "-");
    format!("simulate-{compact}")
}

/// `2026-11-21T23:45:01Z`.
pub fn rfc3339_now() -> String {
    rfc3339_utc(SystemClock.now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_names_sort_by_time() {
        let name = run_dir_name();
        assert_eq!(name.len(), "simulate-20261121-234501".len(), "{name}");
        assert!(name.starts_with("simulate-20"), "{name}");
        assert!(rfc3339_now().ends_with('Z'));
    }
}
