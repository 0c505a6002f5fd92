//! `fedstep job watch`'s view of the current round: a progress bar of the
//! clients accounted for (counted or rejected) out of those expected, and
//! the time left to the deadline, on a terminal; one plain line per change
//! otherwise (CI logs, pipes).

use std::io::IsTerminal;

use fedstep_cloud::records::{RoundRecord, RoundStatus};
use indicatif::{ProgressBar, ProgressStyle};

/// Where the latest round stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundProgress {
    pub round: u32,
    pub status: RoundStatus,
    /// Expected clients counted or rejected so far.
    pub accounted: usize,
    pub expected: usize,
    /// Seconds to the deadline (0 once past it).
    pub seconds_left: i64,
}

impl RoundProgress {
    pub fn of(row: &RoundRecord, now: i64) -> RoundProgress {
        let accounted = row
            .expected_clients
            .iter()
            .filter(|c| row.received.contains(*c) || row.rejections.contains_key(*c))
            .count();
        RoundProgress {
            round: row.round,
            status: row.status,
            accounted,
            expected: row.expected_clients.len(),
            seconds_left: row.deadline.saturating_sub(now).max(0),
        }
    }

    /// "round 3 OPEN: 2/3 clients in, 41 s to the deadline"
    pub fn line(&self) -> String {
        let mut s = format!(
            "round {} {:?}: {}/{} clients in",
            self.round, self.status, self.accounted, self.expected
        );
        if self.status == RoundStatus::Open {
            s += &format!(", {} s to the deadline", self.seconds_left);
        }
        s
    }
}

/// A bar per round on a terminal (stderr), plain lines on stdout otherwise.
pub struct WatchView {
    bar: Option<ProgressBar>,
    round: Option<u32>,
    last_line: String,
}

impl WatchView {
    pub fn new() -> WatchView {
        WatchView {
            bar: std::io::stderr().is_terminal().then(|| {
                let bar = ProgressBar::new(0);
                if let Ok(style) = ProgressStyle::with_template(
                    "round {prefix} [{bar:30}] {pos}/{len} clients in · {msg}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar
            }),
            round: None,
            last_line: String::new(),
        }
    }

    /// Shows `p`; `summary` (the job's one-line state) is printed when the
    /// round changes (on a terminal) or whenever it changes (otherwise).
    pub fn show(&mut self, p: Option<&RoundProgress>, summary: &str) {
        match &self.bar {
            Some(bar) => {
                if let Some(p) = p {
                    if self.round != Some(p.round) {
                        if self.round.is_some() {
                            bar.println(summary);
                        }
                        self.round = Some(p.round);
                        bar.set_prefix(p.round.to_string());
                        bar.set_length(p.expected as u64);
                    }
                    bar.set_position(p.accounted as u64);
                    bar.set_message(match p.status {
                        RoundStatus::Open => format!("{} s to the deadline", p.seconds_left),
                        other => format!("{other:?}"),
                    });
                }
            }
            None => {
                let line = match p {
                    Some(p) => format!("{summary} · {}", p.line()),
                    None => summary.to_string(),
                };
                if line != self.last_line {
                    println!("{line}");
                    self.last_line = line;
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_expected_clients_in_and_the_time_left() {
        let row = RoundRecord {
            job_id: "j".into(),
            round: 2,
            status: RoundStatus::Open,
            task_token: None,
            expected_clients: ["a", "b", "c", "d"].map(String::from).to_vec(),
            min_clients: 2,
            deadline: 1_000,
            // "x" is not expected: not counted.
            received: ["a", "x"].map(String::from).into(),
            rejections: [("b".to_string(), "checksum".to_string())].into(),
            lease_owner: None,
            lease_expires_at: None,
            global_model_key: String::new(),
            global_checksum: String::new(),
            global_store_checksum: None,
            result: None,
            failure: None,
            buffer: None,
            secure_closed: Vec::new(),
            secure_received: Default::default(),
            secure_awaiting: None,
        };
        let p = RoundProgress::of(&row, 959);
        assert_eq!((p.accounted, p.expected, p.seconds_left), (2, 4, 41));
        assert_eq!(
            p.line(),
            "round 2 Open: 2/4 clients in, 41 s to the deadline"
        );
        assert_eq!(RoundProgress::of(&row, 2_000).seconds_left, 0);
    }
}
