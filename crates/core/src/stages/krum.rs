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
    pub fn choose(&self, dist: &[Vec<f64>]) -> Result<(Vec<usize>, Value), String> {
        let n = dist.len();
        let f = self.byzantine;
        if n < 2 * f + 3 {
            return Err(format!(
                "krum with byzantine = {f} needs at least {} valid updates, got {n}",
                2 * f + 3
            ));
        }
        if self.select > n - f {
            return Err(format!(
                "krum: select = {} exceeds n − byzantine = {}",
                self.select,
                n - f
            ));
        }
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
        let mut chosen = order[..self.select].to_vec();
        chosen.sort_unstable();
        let m = json!({
            "byzantine": f,
            "select": self.select,
            "scores": scores,
            "selected": chosen,
        });
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
    fn refuses_too_few_updates() {
        let d = vec![vec![0.0; 4]; 4];
        let err = Krum::new(1, 1).unwrap().choose(&d).unwrap_err();
        assert!(err.contains("at least 5"), "{err}");
    }
}
