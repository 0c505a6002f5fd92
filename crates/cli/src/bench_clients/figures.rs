//! The load test's figures, from the timeline and the rounds as the ledger
//! holds them afterwards. Pure: no AWS, unit-tested below.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fedstep_cloud::records::RoundRecord;

use super::observed::{Event, Next};

/// Nearest-rank percentile (`p` in 0..=100) of `samples`; None when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// When each round first closed.
fn closes(events: &[(Duration, Event)]) -> BTreeMap<u32, Duration> {
    let mut out = BTreeMap::new();
    for (at, e) in events {
        if let Event::RoundClosed { round } = e {
            out.entry(*round).or_insert(*at);
        }
    }
    out
}

/// Per closed round: its last row written → the round closed, in seconds.
pub fn round_close_seconds(events: &[(Duration, Event)]) -> Vec<f64> {
    let mut last_row: BTreeMap<u32, Duration> = BTreeMap::new();
    for (at, e) in events {
        if let Event::RowWritten { round, .. } = e {
            let t = last_row.entry(*round).or_insert(*at);
            *t = (*t).max(*at);
        }
    }
    closes(events)
        .iter()
        .filter_map(|(round, closed)| {
            let row = last_row.get(round)?;
            Some(closed.saturating_sub(*row).as_secs_f64())
        })
        .collect()
}

/// Round closed → each client holds what comes next (the next round's
/// announcement, or `training_complete` after the last round), in seconds;
/// and how many (client, round) pairs never got theirs.
pub fn fanout_seconds(events: &[(Duration, Event)], clients: &[String]) -> (Vec<f64>, usize) {
    let closes = closes(events);
    let last = closes.keys().next_back().copied();
    let mut first_seen: BTreeMap<(&str, Next), Duration> = BTreeMap::new();
    for (at, e) in events {
        if let Event::Received { client, next } = e {
            first_seen.entry((client.as_str(), *next)).or_insert(*at);
        }
    }
    let (mut samples, mut missing) = (Vec::new(), 0);
    for (round, closed) in &closes {
        let next = if Some(*round) == last {
            Next::Complete
        } else {
            Next::Round(round + 1)
        };
        for c in clients {
            match first_seen.get(&(c.as_str(), next)) {
                Some(at) => samples.push(at.saturating_sub(*closed).as_secs_f64()),
                None => missing += 1,
            }
        }
    }
    (samples, missing)
}

/// The fan-out split in two: round closed → the next announcement
/// published (the workflow: SendTaskSuccess, the next StartRound), and
/// published → each client holds it (SNS → SQS → long poll), in seconds,
/// for the announcements that follow a close.
pub fn fanout_parts(events: &[(Duration, Event)]) -> (Vec<f64>, Vec<f64>) {
    let closes = closes(events);
    let mut published: BTreeMap<Next, Duration> = BTreeMap::new();
    for (at, e) in events {
        if let Event::Published { next } = e {
            published.entry(*next).or_insert(*at);
        }
    }
    let last = closes.keys().next_back().copied();
    let workflow = closes
        .iter()
        .filter_map(|(round, closed)| {
            let next = if Some(*round) == last {
                Next::Complete
            } else {
                Next::Round(round + 1)
            };
            Some(published.get(&next)?.saturating_sub(*closed).as_secs_f64())
        })
        .collect();
    let mut seen: BTreeSet<(&str, Next)> = BTreeSet::new();
    let delivery = events
        .iter()
        .filter_map(|(at, e)| match e {
            // Round 1's announcement follows the job's start, not a close.
            Event::Received { client, next }
                if *next != Next::Round(1) && seen.insert((client.as_str(), *next)) =>
            {
                Some(at.saturating_sub(*published.get(next)?).as_secs_f64())
            }
            _ => None,
        })
        .collect();
    (workflow, delivery)
}

/// Rows a client wrote whose round never counted them as received.
pub fn lost_updates(events: &[(Duration, Event)], rounds: &[RoundRecord]) -> usize {
    let written: BTreeSet<(u32, &str)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RowWritten { client, round } => Some((*round, client.as_str())),
            _ => None,
        })
        .collect();
    let by_round: BTreeMap<u32, &RoundRecord> = rounds.iter().map(|r| (r.round, r)).collect();
    written
        .iter()
        .filter(|(round, client)| {
            !by_round
                .get(round)
                .is_some_and(|r| r.received.contains(*client))
        })
        .count()
}

/// Successful CLOSED writes beyond the first, over all rounds.
pub fn extra_closes(events: &[(Duration, Event)]) -> usize {
    let mut per_round: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, e) in events {
        if let Event::RoundClosed { round } = e {
            *per_round.entry(*round).or_default() += 1;
        }
    }
    per_round.values().map(|n| n.saturating_sub(1)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }
    fn row(c: &str, round: u32) -> Event {
        Event::RowWritten {
            client: c.into(),
            round,
        }
    }
    fn got(c: &str, next: Next) -> Event {
        Event::Received {
            client: c.into(),
            next,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    fn two_rounds() -> Vec<(Duration, Event)> {
        vec![
            (s(1.0), row("a", 1)),
            (s(2.0), row("b", 1)),
            (s(2.5), Event::RoundClosed { round: 1 }),
            (s(3.0), got("a", Next::Round(2))),
            (s(3.5), got("b", Next::Round(2))),
            (s(4.0), got("a", Next::Round(2))), // a redelivery: the first counts
            (s(5.0), row("a", 2)),
            (s(6.0), Event::RoundClosed { round: 2 }),
            (s(6.0), Event::RoundClosed { round: 2 }),
            (s(7.0), got("a", Next::Complete)),
        ]
    }

    #[test]
    fn round_close_runs_from_the_last_row() {
        assert_eq!(round_close_seconds(&two_rounds()), vec![0.5, 1.0]);
    }

    #[test]
    fn fanout_counts_each_client_once_and_the_missing() {
        let clients = vec!["a".to_string(), "b".to_string()];
        let (samples, missing) = fanout_seconds(&two_rounds(), &clients);
        assert_eq!(samples, vec![0.5, 1.0, 1.0]);
        assert_eq!(missing, 1, "b never got training_complete");
    }

    #[test]
    fn fanout_splits_into_workflow_and_delivery() {
        let mut events = two_rounds();
        events.push((
            s(2.75),
            Event::Published {
                next: Next::Round(2),
            },
        ));
        events.push((
            s(6.5),
            Event::Published {
                next: Next::Complete,
            },
        ));
        let (workflow, delivery) = fanout_parts(&events);
        assert_eq!(workflow, vec![0.25, 0.5]);
        // a at 3.0, b at 3.5 (a's redelivery at 4.0 is not counted), a at 7.0.
        assert_eq!(delivery, vec![0.25, 0.75, 0.5]);
    }

    #[test]
    fn a_row_the_round_never_received_is_lost() {
        let mut r1: RoundRecord = serde_json::from_value(serde_json::json!({
            "job_id": "j", "round": 1, "status": "CLOSED", "expected_clients": ["a", "b"],
            "min_clients": 2, "deadline": 0, "global_model_key": "k", "global_checksum": "c",
            "received": ["a", "b"]
        }))
        .unwrap();
        let mut r2 = r1.clone();
        r2.round = 2;
        r2.received = ["b".to_string()].into();
        assert_eq!(lost_updates(&two_rounds(), &[r1.clone(), r2]), 1);
        r1.received.clear();
        assert_eq!(lost_updates(&two_rounds(), &[r1]), 3);
    }

    #[test]
    fn a_second_close_of_a_round_is_counted() {
        assert_eq!(extra_closes(&two_rounds()), 1);
    }
}
