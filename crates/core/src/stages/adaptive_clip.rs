//! Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy, "Differentially
//! Private Learning with Adaptive Clipping", NeurIPS 2021): clip to a norm
//! C that follows a target quantile γ of the update norms instead of a
//! hand-tuned constant.
//!
//! Each round, the active updates (those that reached this transform) are
//! clipped to the current C, then C moves geometrically toward the γ-th
//! quantile of their norms:
//!
//! ```text
//! b̄ = (updates with norm ≤ C) / (updates)     (unweighted)
//! C ← C · exp(−η · (b̄ − γ))
//! ```
//!
//! Too many updates under C (b̄ > γ) shrinks it; too few grows it. C is
//! carried to the next round in the state file (`fedstep.adaptive_clip.norm`);
//! the first round, or one without state, uses `initial_norm`. dp_noise after
//! it is calibrated to the round's C (the bound every kept update now has).
//! b̄ is computed in the clear here: the paper's noisy b̄ (for DP over the
//! quantile estimate) is not implemented.

use serde::{Deserialize, Serialize};

use super::clip::{check_norm, clip_to};
use super::{
    measured, params, Scalars, Stage, StageInfo, StageTable, StateSpec, TransformOutcome,
    TransformRound, UpdateTransform,
};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClip {
    /// C on the first round.
    pub initial_norm: f64,
    /// γ: the fraction of updates C should leave unclipped.
    #[serde(default = "half")]
    pub target_quantile: f64,
    /// η: how fast C moves (per round, in log space).
    #[serde(default = "learning_rate")]
    pub learning_rate: f64,
}

fn half() -> f64 {
    0.5
}

fn learning_rate() -> f64 {
    0.2
}

/// What adaptive clipping did this round.
#[derive(Debug, Serialize)]
pub struct AdaptiveClipMeasurement {
    /// The C this round clipped to.
    pub norm: f64,
    /// b̄: the fraction of active updates with norm ≤ C (None: none active).
    pub unclipped_fraction: Option<f64>,
    /// The C the next round will use.
    pub next_norm: f64,
    pub target_quantile: f64,
    pub learning_rate: f64,
    pub clipped_count: usize,
    /// Positions (among the clients that reached the transforms) clipped.
    pub clipped: Vec<usize>,
}

const NORM: &str = "norm";

impl AdaptiveClip {
    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let c: AdaptiveClip = params("adaptive_clip", table)?;
        check_norm("adaptive_clip", "initial_norm", c.initial_norm)?;
        if !(0.0..=1.0).contains(&c.target_quantile) {
            return Err(format!(
                "adaptive_clip: target_quantile must be in [0, 1], got {}",
                c.target_quantile
            ));
        }
        check_norm("adaptive_clip", "learning_rate", c.learning_rate)?;
        Ok(Stage::Transform(Box::new(c)))
    }

    /// The next round's C, given this round's and the fraction b̄ of
    /// updates it left unclipped.
    pub fn next_norm(&self, norm: f64, unclipped_fraction: f64) -> f64 {
        norm * (-self.learning_rate * (unclipped_fraction - self.target_quantile)).exp()
    }

    /// This round's C: the stored one, or `initial_norm` without state.
    fn current_norm(&self, state: Option<&Scalars>) -> Result<f64, String> {
        let Some(stored) = state.and_then(|s| s.get(NORM)) else {
            return Ok(self.initial_norm);
        };
        match stored.parse::<f64>() {
            Ok(c) if c.is_finite() && c > 0.0 => Ok(c),
            _ => Err(format!(
                "the stored norm `{stored}` is not a positive number"
            )),
        }
    }
}

impl StageInfo for AdaptiveClip {
    fn kind(&self) -> &'static str {
        "adaptive_clip"
    }

    fn state(&self) -> Option<StateSpec> {
        Some(StateSpec {
            marker: None,
            scalars: &[NORM],
            tensor_slots: &[],
        })
    }
}

impl UpdateTransform for AdaptiveClip {
    fn bounds_norms(&self) -> bool {
        true
    }

    fn apply(&self, mut round: TransformRound<'_>) -> Result<TransformOutcome, String> {
        let norm = self.current_norm(round.state)?;
        let (mut active, mut within) = (0usize, 0usize);
        for i in 0..round.norms.len() {
            if round.dropped[i].is_none() {
                active += 1;
                within += usize::from(round.norms[i] * round.scales[i] <= norm);
            }
        }
        let clipped = clip_to(norm, &mut round);
        // With no update to count, there is nothing to learn: C stays.
        let fraction = (active > 0).then(|| within as f64 / active as f64);
        let next_norm = fraction.map_or(norm, |b| self.next_norm(norm, b));
        Ok(TransformOutcome {
            measurement: measured(&AdaptiveClipMeasurement {
                norm,
                unclipped_fraction: fraction,
                next_norm,
                target_quantile: self.target_quantile,
                learning_rate: self.learning_rate,
                clipped_count: clipped.len(),
                clipped,
            }),
            norm_bound: Some(norm),
            next_state: Some(Scalars::from([(NORM.to_string(), next_norm.to_string())])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(toml_text: &str) -> Result<AdaptiveClip, String> {
        let table: StageTable = toml::from_str(toml_text).unwrap();
        AdaptiveClip::stage(&table)?;
        params("adaptive_clip", &table)
    }

    #[test]
    fn the_norm_moves_toward_the_target_quantile() {
        let a = stage("kind = \"adaptive_clip\"\ninitial_norm = 1.5").unwrap();
        assert_eq!((a.target_quantile, a.learning_rate), (0.5, 0.2));
        // b̄ = γ: C stays.
        assert_eq!(a.next_norm(2.5, 0.5), 2.5);
        // 1 of 4 under C: C grows by exp(0.2 · 0.25).
        let mut scales = vec![1.0; 4];
        let mut dropped = vec![None; 4];
        let out = a
            .apply(TransformRound {
                norms: &[1.0, 2.0, 3.0, 4.0],
                scales: &mut scales,
                dropped: &mut dropped,
                state: None,
            })
            .unwrap();
        let grown = 1.5 * (0.2f64 * 0.25).exp();
        assert_eq!(out.measurement["norm"], 1.5);
        assert_eq!(out.measurement["unclipped_fraction"], 0.25);
        assert_eq!(out.measurement["next_norm"], grown);
        assert_eq!(out.measurement["clipped_count"], 3);
        assert_eq!(out.norm_bound, Some(1.5));
        assert_eq!(scales, vec![1.0, 0.75, 0.5, 0.375]);
        assert_eq!(out.next_state.unwrap()[NORM].parse::<f64>(), Ok(grown));
        // All under C: C shrinks by exp(−0.2 · 0.5).
        assert_eq!(a.next_norm(8.0, 1.0), 8.0 * (-0.1f64).exp());
    }

    #[test]
    fn stored_norm_is_used_and_checked() {
        let a = stage("kind = \"adaptive_clip\"\ninitial_norm = 1.0").unwrap();
        let state = Scalars::from([(NORM.to_string(), "3".to_string())]);
        assert_eq!(a.current_norm(Some(&state)), Ok(3.0));
        assert_eq!(a.current_norm(None), Ok(1.0));
        let bad = Scalars::from([(NORM.to_string(), "-1".to_string())]);
        assert!(a.current_norm(Some(&bad)).unwrap_err().contains("`-1`"));
    }

    #[test]
    fn zeroed_updates_do_not_count() {
        let a = stage("kind = \"adaptive_clip\"\ninitial_norm = 2.0").unwrap();
        let mut dropped = vec![Some("zeroed".to_string()), None];
        let out = a
            .apply(TransformRound {
                norms: &[100.0, 1.0],
                scales: &mut [1.0, 1.0],
                dropped: &mut dropped,
                state: None,
            })
            .unwrap();
        assert_eq!(out.measurement["unclipped_fraction"], 1.0);
        assert_eq!(out.measurement["clipped_count"], 0);
    }

    #[test]
    fn bad_parameters_are_named() {
        for (text, want) in [
            ("", "initial_norm"),
            ("initial_norm = 0.0", "initial_norm"),
            (
                "initial_norm = 1.0\ntarget_quantile = 1.5",
                "target_quantile",
            ),
            ("initial_norm = 1.0\nlearning_rate = -0.1", "learning_rate"),
            ("initial_norm = 1.0\nmax_norm = 1.0", "max_norm"),
        ] {
            let err = stage(&format!("kind = \"adaptive_clip\"\n{text}")).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
