//! Update-norm clipping: scales each client's update (local − global) down
//! to an L2 norm of at most `max_norm`. Bounds any one client's influence and
//! is the sensitivity bound that DP noise is calibrated to.

use serde::{Deserialize, Serialize};

use super::{
    measured, params, Stage, StageInfo, StageTable, TransformOutcome, TransformRound,
    UpdateTransform,
};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clip {
    pub max_norm: f64,
}

/// What clipping did this round.
#[derive(Debug, Serialize)]
pub struct ClipMeasurement {
    pub max_norm: f64,
    pub clipped_count: usize,
    /// Positions (among the clients that reached the transforms) clipped.
    pub clipped: Vec<usize>,
}

impl Clip {
    pub fn new(max_norm: f64) -> Result<Self, String> {
        check_norm("clip", "max_norm", max_norm)?;
        Ok(Clip { max_norm })
    }

    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let c: Clip = params("clip", table)?;
        Ok(Stage::Transform(Box::new(Clip::new(c.max_norm)?)))
    }
}

/// A norm bound must be a positive finite number.
pub fn check_norm(kind: &str, key: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{kind}: {key} must be a positive number, got {v}"))
    }
}

/// Scales every active update whose current norm exceeds `bound` down to
/// it; returns the positions clipped.
pub fn clip_to(bound: f64, round: &mut TransformRound<'_>) -> Vec<usize> {
    let mut clipped = Vec::new();
    for i in 0..round.norms.len() {
        if round.dropped[i].is_some() {
            continue;
        }
        let current = round.norms[i] * round.scales[i];
        if current > bound {
            round.scales[i] *= bound / current;
            clipped.push(i);
        }
    }
    clipped
}

impl StageInfo for Clip {
    fn kind(&self) -> &'static str {
        "clip"
    }
}

impl UpdateTransform for Clip {
    fn bounds_norms(&self) -> bool {
        true
    }

    fn apply(&self, mut round: TransformRound<'_>) -> Result<TransformOutcome, String> {
        let clipped = clip_to(self.max_norm, &mut round);
        Ok(TransformOutcome {
            measurement: measured(&ClipMeasurement {
                max_norm: self.max_norm,
                clipped_count: clipped.len(),
                clipped,
            }),
            norm_bound: Some(self.max_norm),
            next_state: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_only_updates_above_the_bound() {
        let c = Clip::new(2.0).unwrap();
        let mut scales = vec![1.0, 1.0, 1.0];
        let mut dropped = vec![None, None, Some("zeroed".to_string())];
        let out = c
            .apply(TransformRound {
                norms: &[1.0, 4.0, 8.0],
                scales: &mut scales,
                dropped: &mut dropped,
                state: None,
            })
            .unwrap();
        assert_eq!(scales, vec![1.0, 0.5, 1.0]);
        assert_eq!(out.measurement["clipped_count"], 1);
        assert_eq!(out.norm_bound, Some(2.0));
        assert!(Clip::new(0.0).is_err() && Clip::new(f64::NAN).is_err());
    }
}
