//! Krum and Multi-Krum (Blanchard et al., 2017). Each update is scored by
//! the sum of squared distances to its n − f − 2 nearest neighbours; the
//! `select` lowest-scored updates are averaged (1 = Krum). Distances come
//! from the Gram matrix computed in the statistics pass, so clipping can
//! rescale updates without another pass over the data.

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Krum {
    pub byzantine: usize,
    pub select: usize,
}

impl Krum {
    pub fn new(byzantine: usize, select: usize) -> Result<Self, String> {
        if select == 0 {
            return Err("krum: select must be at least 1".into());
        }
        Ok(Krum { byzantine, select })
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
    pub fn choose(&self, dist: &[Vec<f64>]) -> Result<(Vec<usize>, Value), String> {
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
            return Ok((
                all.clone(),
                json!({"byzantine": wanted, "select": n, "selected": all, "degraded": why}),
            ));
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
        let mut m = json!({
            "byzantine": f,
            "select": select,
            "scores": scores,
            "selected": chosen,
        });
        if let Some(why) = degraded {
            m["degraded"] = json!(why);
        }
        Ok((chosen, m))
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
        assert!(m["scores"][4].as_f64().unwrap() > 1e4);
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
        assert_eq!(m["byzantine"], 0);
        let why = m["degraded"].as_str().unwrap();
        assert!(why.contains("2·1 + 3 = 5"), "{why}");
        let (chosen, m) = Krum::new(1, 1).unwrap().choose(&d).unwrap();
        assert_ne!(chosen, vec![3], "the outlier is never the pick");
        assert!(m["degraded"].is_string());
        // Enough updates: nothing degraded.
        let five = distances_from_gram(
            &gram(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]]),
            &[1.0; 5],
        );
        let (_, m) = Krum::new(1, 1).unwrap().choose(&five).unwrap();
        assert!(m.get("degraded").is_none());
        // Two updates cannot be told apart: both kept; none is an error.
        let (chosen, m) = Krum::new(2, 1)
            .unwrap()
            .choose(&vec![vec![0.0; 2]; 2])
            .unwrap();
        assert_eq!(chosen, vec![0, 1]);
        assert!(m["degraded"].as_str().unwrap().contains("only 2"));
        assert!(Krum::new(1, 1).unwrap().choose(&[]).is_err());
    }
}
