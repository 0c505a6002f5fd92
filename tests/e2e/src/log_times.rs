//! When things happened, from the clients' logs: each line of
//! fedstep-client's log starts with an RFC 3339 UTC timestamp (microseconds).

use chrono::{DateTime, FixedOffset};

/// The timestamp of the first line containing `needle`.
pub fn first_line_time(log: &str, needle: &str) -> Option<DateTime<FixedOffset>> {
    log.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
}

/// Seconds from `a` to `b` (negative if b is earlier).
pub fn seconds_between(a: DateTime<FixedOffset>, b: DateTime<FixedOffset>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tracing_timestamps() {
        let log = "2026-11-22T10:00:00.250000Z  INFO fedstep_client::worker: a: j round 1: announced\n\
                   2026-11-22T10:00:01.000000Z  INFO fedstep_client::worker: a: j round 1: update submitted\n";
        let a = first_line_time(log, "round 1: announced").unwrap();
        let b = first_line_time(log, "round 1: update submitted").unwrap();
        assert!((seconds_between(a, b) - 0.75).abs() < 1e-9);
        assert!(first_line_time(log, "round 2").is_none());
    }
}
