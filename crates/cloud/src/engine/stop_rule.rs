//! Whether the job goes on after a round: decided here, in Rust, so the
//! state machine only reads a boolean.

use std::collections::BTreeMap;

use crate::job::{JobSpec, StopMode};

/// `history`: the stop metric's value in each earlier round that reported
/// it, oldest first. `metrics`: this round's aggregated metrics, where the
/// stop metric's plain name holds the median of the accepted clients'
/// reports (`metrics::round_metrics`): one client reporting an absurd value
/// can neither end the job early nor hold it back, as long as the others
/// are more than half of the reporters.
pub(super) fn should_continue(
    job: &JobSpec,
    round: u32,
    history: &[f64],
    metrics: &BTreeMap<String, f64>,
) -> bool {
    if round >= job.rounds {
        return false;
    }
    let Some(stop) = &job.stop else {
        return true;
    };
    // A round without the metric cannot trigger the rule.
    let Some(&value) = metrics.get(&stop.metric).filter(|v| v.is_finite()) else {
        return true;
    };
    let better = |a: f64, b: f64| match stop.mode {
        StopMode::Max => a > b,
        StopMode::Min => a < b,
    };
    if let Some(target) = stop.target {
        let reached = match stop.mode {
            StopMode::Max => value >= target,
            StopMode::Min => value <= target,
        };
        if reached {
            return false;
        }
    }
    if let Some(patience) = stop.patience {
        // Rounds since the best value so far (ties are no improvement).
        let mut series = history.iter().copied().chain(std::iter::once(value));
        let mut best = series.next().unwrap_or(value);
        let mut since = 0u32;
        for v in series {
            if better(v, best) {
                best = v;
                since = 0;
            } else {
                since += 1;
            }
        }
        if since >= patience.max(1) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::StopRule;

    fn job(stop: Option<StopRule>) -> JobSpec {
        JobSpec {
            job_id: "j".into(),
            rounds: 10,
            clients: vec!["a".into()],
            min_clients: 1,
            round_timeout_seconds: 60,
            initial_model: None,
            stop,
            aggregation: Default::default(),
            round_config: Default::default(),
            sharding: Default::default(),
            mode: Default::default(),
            asynchronous: None,
            secure_aggregation: None,
        }
    }

    fn m(v: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("loss".to_string(), v)])
    }

    #[test]
    fn rounds_target_and_patience() {
        assert!(should_continue(&job(None), 9, &[], &m(1.0)));
        assert!(!should_continue(&job(None), 10, &[], &m(1.0)));
        let rule = |target, patience| {
            job(Some(StopRule {
                metric: "loss".into(),
                target,
                mode: StopMode::Min,
                patience,
            }))
        };
        assert!(!should_continue(&rule(Some(0.5), None), 1, &[], &m(0.4)));
        assert!(should_continue(&rule(Some(0.5), None), 1, &[], &m(0.6)));
        assert!(should_continue(
            &rule(Some(0.5), None),
            1,
            &[],
            &BTreeMap::new()
        ));
        // best 0.7 at round 1, then two rounds without improvement.
        assert!(should_continue(&rule(None, Some(2)), 2, &[0.7], &m(0.8)));
        assert!(!should_continue(
            &rule(None, Some(2)),
            3,
            &[0.7, 0.8],
            &m(0.7)
        ));
        assert!(should_continue(
            &rule(None, Some(2)),
            3,
            &[0.7, 0.8],
            &m(0.6)
        ));
    }
}
