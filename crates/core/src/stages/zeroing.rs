//! Zeroing: drops an update whose L2 norm (local − global) exceeds
//! `max_norm`. Unlike TFF's zeroing, which averages a zero in with the
//! client's weight, a dropped update leaves the weighted mean entirely (its
//! weight would otherwise pull the model toward the old global). It is
//! recorded per client with its norm, never dropped silently.

use serde::{Deserialize, Serialize};

use super::clip::check_norm;
use super::{
    measured, params, Stage, StageInfo, StageTable, TransformOutcome, TransformRound,
    UpdateTransform,
};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zeroing {
    pub max_norm: f64,
}

/// What zeroing did this round.
#[derive(Debug, Serialize)]
pub struct ZeroingMeasurement {
    pub max_norm: f64,
    pub zeroed_count: usize,
    /// Positions (among the clients that reached the transforms) dropped.
    pub zeroed: Vec<usize>,
}

impl Zeroing {
    pub fn new(max_norm: f64) -> Result<Self, String> {
        check_norm("zeroing", "max_norm", max_norm)?;
        Ok(Zeroing { max_norm })
    }

    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let z: Zeroing = params("zeroing", table)?;
        Ok(Stage::Transform(Box::new(Zeroing::new(z.max_norm)?)))
    }
}

impl StageInfo for Zeroing {
    fn kind(&self) -> &'static str {
        "zeroing"
    }
}

impl UpdateTransform for Zeroing {
    fn apply(&self, round: TransformRound<'_>) -> Result<TransformOutcome, String> {
        let mut zeroed = Vec::new();
        for i in 0..round.norms.len() {
            if round.dropped[i].is_some() {
                continue;
            }
            let current = round.norms[i] * round.scales[i];
            if current > self.max_norm {
                round.dropped[i] = Some(format!(
                    "update norm {current:.6e} exceeds the zeroing bound {}",
                    self.max_norm
                ));
                zeroed.push(i);
            }
        }
        Ok(TransformOutcome {
            measurement: measured(&ZeroingMeasurement {
                max_norm: self.max_norm,
                zeroed_count: zeroed.len(),
                zeroed,
            }),
            norm_bound: None,
            next_state: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_only_updates_above_the_bound() {
        let z = Zeroing::new(10.0).unwrap();
        let mut dropped = vec![None, None];
        let out = z
            .apply(TransformRound {
                norms: &[5.0, 1e6],
                scales: &mut [1.0, 1.0],
                dropped: &mut dropped,
                state: None,
            })
            .unwrap();
        assert!(dropped[0].is_none());
        assert!(dropped[1].as_deref().unwrap().contains("zeroing bound 10"));
        assert_eq!(out.measurement["zeroed_count"], 1);
    }
}
