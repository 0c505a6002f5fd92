//! Krum and Multi-Krum (Blanchard et al., 2017). Each update is scored by
//! the sum of squared distances to its n − f − 2 nearest neighbours; the
//! `select` lowest-scored updates are averaged (1 = Krum) with their
//! weights, like the mean. Distances come from the Gram matrix computed in
//! the statistics pass, so clipping can rescale updates without another
//! pass over the data.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::mean::Mean;
use super::{
    measured, params, CombineBlock, CombineKernel, Combiner, MinUpdates, RoundCombiner, Selection,
    Stage, StageInfo, StageTable,
};
use crate::combine::CombineError;
use crate::float::Acc;

#[derive(Debug, Clone, PartialEq)]
pub struct Krum {
    pub byzantine: usize,
    pub select: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KrumParams {
    byzantine: usize,
    #[serde(default = "one")]
    select: usize,
}

fn one() -> usize {
    1
}

/// What Krum chose this round.
#[derive(Debug, Serialize)]
pub struct KrumMeasurement {
    /// The tolerance applied (lower than configured when degraded).
    pub byzantine: usize,
    pub select: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f64>>,
    pub selected: Vec<usize>,
    /// Why the configured tolerance could not be applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

impl Krum {
    pub fn new(byzantine: usize, select: usize) -> Result<Self, String> {
        if select == 0 {
            return Err("krum: select must be at least 1".into());
        }
        Ok(Krum { byzantine, select })
    }

    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let p: KrumParams = params("krum", table)?;
        Ok(Stage::Combiner(Box::new(Krum::new(p.byzantine, p.select)?)))
    }

    /// Chooses updates given pairwise squared distances `dist[i][j]` among
    /// the `n` candidates. Returns the chosen indices (into `dist`) and
    /// measurements.
    ///
    /// Krum tolerates f Byzantine updates among n ≥ 2f + 3. Job validation
    /// requires that many clients, but rejections at run time can leave
    /// fewer: then the round still closes, with the tolerance lowered to
    /// the largest f that n supports (and `select` to at most n − f), and
    /// the measurements say so under `degraded`. Below 3 updates Krum can
    /// tell none apart: all are kept.
    pub fn choose(&self, dist: &[Vec<f64>]) -> Result<(Vec<usize>, KrumMeasurement), String> {
        let n = dist.len();
        if n == 0 {
            return Err("krum: no valid update to choose from".into());
        }
        let wanted = self.byzantine;
        let (f, select, degraded) = if n >= 2 * wanted + 3 {
            (wanted, self.select.min(n - wanted), None)
        } else if n >= 3 {
            let f = (n - 3) / 2;
            (
                f,
                self.select.min(n - f),
                Some(format!(
                    "only {n} valid updates, below the 2·{wanted} + 3 = {} that byzantine = {wanted} needs: \
                     tolerating {f} instead",
                    2 * wanted + 3
                )),
            )
        } else {
            let all: Vec<usize> = (0..n).collect();
            let why = format!(
                "only {n} valid update(s): Krum needs 3 to tell one apart, so all are kept"
            );
            let m = KrumMeasurement {
                byzantine: wanted,
                select: n,
                scores: None,
                selected: all.clone(),
                degraded: Some(why),
            };
            return Ok((all, m));
        };
        let neighbours = n - f - 2;
        let scores: Vec<f64> = (0..n)
            .map(|i| {
                let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
                d.sort_by(f64::total_cmp);
                d[..neighbours].iter().sum()
            })
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        // Ties go to the lower index so the choice is deterministic.
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut chosen = order[..select].to_vec();
        chosen.sort_unstable();
        let m = KrumMeasurement {
            byzantine: f,
            select,
            scores: Some(scores),
            selected: chosen.clone(),
            degraded,
        };
        Ok((chosen, m))
    }
}

impl StageInfo for Krum {
    fn kind(&self) -> &'static str {
        "krum"
    }

    fn fedselect_refusal(&self) -> Option<&'static str> {
        Some(
            "it scores whole updates by distance, and clients that personalize different \
             elements look far apart for reasons unrelated to attacks; use clip/zeroing",
        )
    }
}

impl Combiner for Krum {
    fn needs_gram(&self) -> bool {
        true
    }

    fn min_updates(&self) -> Option<MinUpdates> {
        let need = self.byzantine.saturating_mul(2).saturating_add(3);
        Some(MinUpdates {
            need,
            setting: format!("krum, byzantine = {}", self.byzantine),
            why: format!("krum needs n ≥ 2·byzantine + 3 = {need} updates"),
        })
    }

    fn select(&self, distances: &[Vec<f64>]) -> Result<Option<Selection>, String> {
        let (chosen, m) = self.choose(distances)?;
        Ok(Some(Selection {
            chosen,
            reason: format!("krum: not among the {} best-scored updates", self.select),
            measurement: measured(&m),
        }))
    }

    fn reads_global(&self, scaled: bool, global_coef: f64) -> bool {
        Mean.reads_global(scaled, global_coef)
    }

    fn for_round(&self, _n: usize, _round: u64) -> (Box<dyn RoundCombiner>, Option<Value>) {
        (Box::new(KrumRound), None)
    }
}

/// The chosen updates are averaged with their weights.
struct KrumRound;

impl<A: Acc> CombineKernel<A> for KrumRound {
    fn combine_block(&self, b: &CombineBlock<'_, A>, out: &mut [A]) -> Result<(), CombineError> {
        Mean.combine_block(b, out)
    }
}

/// Squared distances from a Gram matrix of (scaled) updates:
/// ‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩, clamped at 0 against rounding.
pub fn distances_from_gram(gram: &[Vec<f64>], scales: &[f64]) -> Vec<Vec<f64>> {
    let n = gram.len();
    let mut d = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let v = scales[i] * scales[i] * gram[i][i] + scales[j] * scales[j] * gram[j][j]
                    - 2.0 * scales[i] * scales[j] * gram[i][j];
                d[i][j] = v.max(0.0);
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram(points: &[[f64; 2]]) -> Vec<Vec<f64>> {
        points
            .iter()
            .map(|a| points.iter().map(|b| a[0] * b[0] + a[1] * b[1]).collect())
            .collect()
    }

    #[test]
    fn picks_the_update_in_the_cluster() {
        // Four honest points near the origin, one far outlier (f = 1).
        let pts = [
            [0.0, 0.0],
            [1.0, 0.0],
            [0.0, 1.0],
            [1.0, 1.0],
            [100.0, 100.0],
        ];
        let d = distances_from_gram(&gram(&pts), &[1.0; 5]);
        assert_eq!(d[0][1], 1.0);
        assert_eq!(d[0][3], 2.0);
        let (chosen, m) = Krum::new(1, 1).unwrap().choose(&d).unwrap();
        // n − f − 2 = 2 neighbours. Scores: p0: 1+1 = 2, p1: 1+1, p2: 2, p3: 2, outlier huge.
        assert_eq!(chosen, vec![0]);
        assert!(m.scores.unwrap()[4] > 1e4);
        let (chosen, _) = Krum::new(1, 4).unwrap().choose(&d).unwrap();
        assert_eq!(chosen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn too_few_updates_degrade_the_tolerance_with_a_reason() {
        // Four points, byzantine = 1 needs five: tolerate 0 (n − 2 = 2
        // neighbours), still pick the most central one.
        let pts = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0]];
        let d = distances_from_gram(&gram(&pts), &[1.0; 4]);
        let (chosen, m) = Krum::new(1, 3).unwrap().choose(&d).unwrap();
        assert_eq!(chosen, vec![0, 1, 2], "select 3 ≤ n − 0 = 4");
        assert_eq!(m.byzantine, 0);
        let why = m.degraded.unwrap();
        assert!(why.contains("2·1 + 3 = 5"), "{why}");
        let (chosen, m) = Krum::new(1, 1).unwrap().choose(&d).unwrap();
        assert_ne!(chosen, vec![3], "the outlier is never the pick");
        assert!(m.degraded.is_some());
        // Enough updates: nothing degraded.
        let five = distances_from_gram(
            &gram(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]]),
            &[1.0; 5],
        );
        let (_, m) = Krum::new(1, 1).unwrap().choose(&five).unwrap();
        assert!(m.degraded.is_none());
        // Two updates cannot be told apart: both kept; none is an error.
        let (chosen, m) = Krum::new(2, 1)
            .unwrap()
            .choose(&vec![vec![0.0; 2]; 2])
            .unwrap();
        assert_eq!(chosen, vec![0, 1]);
        assert!(m.degraded.unwrap().contains("only 2"));
        assert!(Krum::new(1, 1).unwrap().choose(&[]).is_err());
    }
}
