//! The server variate's update from the round's Δc_i.
//!
//! `c⁺ = c + (|S|/N)·(1/|S|)·Σ_{i∈S} Δc_i`: the mean over the clients
//! whose Δc_i was accepted, scaled by their share of the job's N clients.
//! The mean is unweighted, as in the paper: c estimates the mean of the
//! clients' variates, each client counting once (the model's mean may be
//! weighted by examples; the variate's is not, so a client claiming many
//! examples cannot steer every other client's correction).
//!
//! A Δc_i is untrusted: one that does not parse (shape, dtype, NaN) is left
//! out with a reason and the update goes on with the others; with none
//! left, c stays as it was.

use serde::{Deserialize, Serialize};

use super::variate::{ControlVariate, VariateLayout};
use crate::limits::Limits;

/// One client's Δc_i as received.
pub struct VariateDelta<'a> {
    pub client_id: &'a str,
    pub bytes: &'a [u8],
}

/// The new server variate and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerUpdate {
    pub variate: ControlVariate,
    pub measurement: ServerUpdateMeasurement,
}

/// The round's record of the update (JSON under `scaffold`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerUpdateMeasurement {
    /// Clients whose Δc_i went into the mean (|S|).
    pub used: Vec<String>,
    /// Clients whose Δc_i was refused, with the reason.
    pub rejected: Vec<(String, String)>,
    /// The job's client count (N).
    pub total_clients: usize,
    /// |S|/N.
    pub participation: f64,
    /// L2 norm of c⁺ − c.
    pub step_norm: f64,
}

/// `c⁺ = c + (|S|/N)·mean Δc_i` over the Δc_i that parse against
/// `layout`. `total_clients` is the job's N (≥ 1). All the Δc_i at once:
/// [`VariateSum`] takes them one at a time.
pub fn update_server_variate(
    current: &ControlVariate,
    deltas: &[VariateDelta<'_>],
    total_clients: usize,
    limits: &Limits,
) -> Result<ServerUpdate, String> {
    let mut sum = VariateSum::new(current.layout());
    for d in deltas {
        sum.add(d.client_id, d.bytes, limits);
    }
    sum.finish(current, total_clients)
}

/// The running Σ Δc_i, fed one client's bytes at a time, so the server
/// holds c, the sum and one Δc_i, never every client's at once (the
/// deployed aggregator reads them from the store in turn).
pub struct VariateSum {
    layout: VariateLayout,
    sum: Vec<Vec<f64>>,
    used: Vec<String>,
    rejected: Vec<(String, String)>,
}

impl VariateSum {
    pub fn new(layout: &VariateLayout) -> VariateSum {
        VariateSum {
            layout: layout.clone(),
            sum: layout
                .tensors()
                .iter()
                .map(|(_, s)| vec![0.0; s.iter().product()])
                .collect(),
            used: Vec::new(),
            rejected: Vec::new(),
        }
    }

    /// Adds one client's Δc_i, or leaves it out with the reason it does
    /// not parse. Clients are counted in the order they are added.
    pub fn add(&mut self, client_id: &str, bytes: &[u8], limits: &Limits) {
        match ControlVariate::parse(bytes, &self.layout, limits) {
            Ok((delta, _)) => {
                for (acc, v) in self.sum.iter_mut().zip(delta.values()) {
                    acc.iter_mut().zip(v).for_each(|(a, x)| *a += f64::from(*x));
                }
                self.used.push(client_id.to_string());
            }
            Err(reason) => self.reject(client_id, format!("scaffold Δc: {reason}")),
        }
    }

    /// Leaves a client's Δc_i out for a reason found before parsing (not
    /// readable, not the bytes its row committed to).
    pub fn reject(&mut self, client_id: &str, reason: String) {
        self.rejected.push((client_id.to_string(), reason));
    }

    /// `c⁺ = c + (|S|/N)·(1/|S|)·Σ` over the clients added; c unchanged
    /// when none was usable.
    pub fn finish(
        self,
        current: &ControlVariate,
        total_clients: usize,
    ) -> Result<ServerUpdate, String> {
        if total_clients == 0 {
            return Err("SCAFFOLD needs the job's client count (N ≥ 1)".into());
        }
        if current.layout() != &self.layout {
            return Err("the server variate and the Δc_i have different layouts".into());
        }
        // (|S|/N)·(1/|S|)·Σ = Σ/N; written as the paper's two factors so
        // the measurement's participation is the one applied.
        let participation = self.used.len() as f64 / total_clients as f64;
        let mean_scale = if self.used.is_empty() {
            0.0
        } else {
            participation / self.used.len() as f64
        };
        let mut step_sq = 0.0;
        let values = current
            .values()
            .iter()
            .zip(&self.sum)
            .map(|(c, s)| {
                c.iter()
                    .zip(s)
                    .map(|(c, s)| {
                        let next = (f64::from(*c) + mean_scale * s) as f32;
                        step_sq += (f64::from(next) - f64::from(*c)).powi(2);
                        next
                    })
                    .collect()
            })
            .collect();
        // Finite Δc_i can still overflow F32 in c⁺: the clients' doing, not
        // the round's failure. Which one cannot be told apart, so none of
        // this round's Δc_i count and c stays as it was.
        let variate = match ControlVariate::from_values(&self.layout, values) {
            Ok(v) => v,
            Err(e) => {
                let reason =
                    format!("scaffold Δc: c + (|S|/N)·mean Δc_i is not finite ({e}); c kept");
                let mut rejected = self.rejected;
                rejected.extend(self.used.into_iter().map(|c| (c, reason.clone())));
                return Ok(ServerUpdate {
                    variate: current.clone(),
                    measurement: ServerUpdateMeasurement {
                        used: Vec::new(),
                        rejected,
                        total_clients,
                        participation: 0.0,
                        step_norm: 0.0,
                    },
                });
            }
        };
        Ok(ServerUpdate {
            variate,
            measurement: ServerUpdateMeasurement {
                used: self.used,
                rejected: self.rejected,
                total_clients,
                participation,
                step_norm: step_sq.sqrt(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn layout() -> VariateLayout {
        VariateLayout::of_model_bytes(&model(), &Limits::default()).unwrap()
    }

    /// A model with a float tensor `w` [2], a float `b` [1] and an integer
    /// tensor that gets no variate.
    fn model() -> Vec<u8> {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let w = [0u8; 8];
        let b = [0u8; 4];
        let step = [0u8; 8];
        safetensors::serialize(
            [
                ("w", TensorView::new(Dtype::F32, vec![2], &w).unwrap()),
                ("b", TensorView::new(Dtype::F32, vec![1], &b).unwrap()),
                (
                    "steps",
                    TensorView::new(Dtype::I64, vec![1], &step).unwrap(),
                ),
            ],
            None,
        )
        .unwrap()
    }

    fn v(w: [f32; 2], b: f32) -> ControlVariate {
        let l = layout();
        let values = l
            .tensors()
            .iter()
            .map(|(n, _)| if n == "w" { w.to_vec() } else { vec![b] })
            .collect();
        ControlVariate::from_values(&l, values).unwrap()
    }

    fn bytes(c: &ControlVariate) -> Vec<u8> {
        c.to_bytes(&BTreeMap::new()).unwrap()
    }

    fn close(c: &ControlVariate, w: [f32; 2], b: f32) {
        let got = [
            c.get("w").unwrap()[0],
            c.get("w").unwrap()[1],
            c.get("b").unwrap()[0],
        ];
        for (x, y) in got.iter().zip([w[0], w[1], b]) {
            assert!((x - y).abs() < 1e-6, "{got:?} vs {w:?} {b}");
        }
    }

    #[test]
    fn server_variate_update_by_hand() {
        // c = [1, -1 | 0.5]; N = 4 clients, 2 take part:
        // Δc_a = [0.4, 0.2 | -1], Δc_b = [0.0, 0.6 | 3]
        // mean = [0.2, 0.4 | 1], |S|/N = 1/2 → step [0.1, 0.2 | 0.5]
        // c⁺ = [1.1, -0.8 | 1.0]
        let c = v([1.0, -1.0], 0.5);
        let (a, b) = (bytes(&v([0.4, 0.2], -1.0)), bytes(&v([0.0, 0.6], 3.0)));
        let deltas = [
            VariateDelta {
                client_id: "a",
                bytes: &a,
            },
            VariateDelta {
                client_id: "b",
                bytes: &b,
            },
        ];
        let out = update_server_variate(&c, &deltas, 4, &Limits::default()).unwrap();
        close(&out.variate, [1.1, -0.8], 1.0);
        let m = &out.measurement;
        assert_eq!(m.used, ["a", "b"]);
        assert_eq!(m.participation, 0.5);
        assert!((m.step_norm - (0.01f64 + 0.04 + 0.25).sqrt()).abs() < 1e-6);
        // Full participation: c⁺ = c + mean = [1.2, -0.6 | 1.5].
        let full = update_server_variate(&c, &deltas, 2, &Limits::default()).unwrap();
        close(&full.variate, [1.2, -0.6], 1.5);
    }

    #[test]
    fn a_bad_delta_is_left_out_with_a_reason_and_the_round_goes_on() {
        let c = v([1.0, -1.0], 0.5);
        let good = bytes(&v([0.4, 0.2], -1.0));
        let out = update_server_variate(
            &c,
            &[
                VariateDelta {
                    client_id: "bad",
                    bytes: b"not a variate",
                },
                VariateDelta {
                    client_id: "good",
                    bytes: &good,
                },
            ],
            2,
            &Limits::default(),
        )
        .unwrap();
        // Only `good` counts: |S|/N = 1/2, mean = Δc_good.
        close(&out.variate, [1.2, -0.9], 0.0);
        assert_eq!(out.measurement.used, ["good"]);
        assert_eq!(out.measurement.rejected.len(), 1);
        assert!(out.measurement.rejected[0]
            .1
            .starts_with("scaffold Δc: not a control variate"));
        // Nobody usable: c unchanged.
        let none = update_server_variate(
            &c,
            &[VariateDelta {
                client_id: "bad",
                bytes: b"x",
            }],
            2,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(none.variate, c);
        assert_eq!(none.measurement.participation, 0.0);
    }

    #[test]
    fn an_overflowing_sum_keeps_c_and_counts_no_delta_instead_of_failing() {
        let c = v([3.0e38, 0.0], 0.0);
        let big = bytes(&v([3.0e38, 0.0], 0.0));
        let out = update_server_variate(
            &c,
            &[VariateDelta {
                client_id: "a",
                bytes: &big,
            }],
            1,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(out.variate, c);
        assert!(out.measurement.used.is_empty());
        assert_eq!(out.measurement.participation, 0.0);
        assert_eq!(out.measurement.rejected[0].0, "a");
        assert!(out.measurement.rejected[0].1.contains("not finite"));
    }

    #[test]
    fn the_integer_tensor_has_no_variate() {
        let l = layout();
        let names: Vec<&str> = l.tensors().iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"w") && names.contains(&"b") && !names.contains(&"steps"));
    }
}
