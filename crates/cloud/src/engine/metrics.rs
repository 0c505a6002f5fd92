//! The round's metrics, from what the accepted clients report about
//! themselves. Those reports are untrusted, and the stop rule decides on
//! them (`stop_rule`), so no single client may move them far or grow them:
//!
//! - At most [`MAX_METRICS`] names enter the result: those the most
//!   accepted clients reported (ties: name order), so a client inventing
//!   names cannot push out the ones everybody reports. A name is 1–64 bytes
//!   of `A–Z a–z 0–9 _ . -`; other names and non-finite or non-numeric
//!   values are ignored, as are the reserved count names below.
//! - `{name}` is the unweighted median of the accepted clients' values: the
//!   statistic the stop rule decides on. Fewer than half the reporting
//!   clients cannot move it outside the range of the others' values (with
//!   two reporters it is their mean: robustness needs three or more).
//! - `{name}:mean` is the mean weighted by the aggregation weights: the
//!   number that matches how much each client shaped the model, reported
//!   for operators and never decided on (one client reporting 1e300 makes
//!   it 1e300; a mean that overflows is left out). The `:` keeps it apart
//!   from any client's name.
//! - `clients_accepted`, `clients_rejected`: counts, not client reports.

use std::collections::BTreeMap;

use fedstep_core::measurements::{ClientStatus, Measurements};

use crate::records::UpdateRecord;

/// Metric names per round result. Each name costs at most two entries
/// (median and mean) of ≤ 70 bytes: a few KB of the round item and result.
pub(super) const MAX_METRICS: usize = 32;
/// Longest metric name kept.
pub(super) const MAX_NAME_BYTES: usize = 64;
/// Suffix of the weighted mean's key.
pub(super) const MEAN_SUFFIX: &str = ":mean";
const COUNTS: [&str; 2] = ["clients_accepted", "clients_rejected"];

#[derive(Default)]
struct Reports {
    values: Vec<f64>,
    weighted_sum: f64,
    weight: f64,
}

pub(super) fn round_metrics(
    m: &Measurements,
    rows: &BTreeMap<String, UpdateRecord>,
    rejected: usize,
) -> BTreeMap<String, f64> {
    let mut by_name: BTreeMap<&str, Reports> = BTreeMap::new();
    for c in m
        .clients
        .iter()
        .filter(|c| c.status == ClientStatus::Accepted)
    {
        let Some(row) = rows.get(&c.client_id) else {
            continue;
        };
        let weight = c.weight.filter(|w| w.is_finite() && *w > 0.0);
        for (name, v) in &row.metrics {
            // Non-numeric or non-finite claims are skipped, not fatal.
            let Some(x) = v.as_f64().filter(|x| x.is_finite()) else {
                continue;
            };
            if !valid_name(name) {
                continue;
            }
            let e = by_name.entry(name).or_default();
            e.values.push(x);
            if let Some(w) = weight {
                e.weighted_sum += w * x;
                e.weight += w;
            }
        }
    }
    let mut named: Vec<(&str, Reports)> = by_name.into_iter().collect();
    // Stable: equal counts stay in name order.
    named.sort_by_key(|(_, r)| std::cmp::Reverse(r.values.len()));
    named.truncate(MAX_METRICS);

    let mut out = BTreeMap::new();
    for (name, mut r) in named {
        out.insert(name.to_string(), median(&mut r.values));
        let mean = r.weighted_sum / r.weight;
        if r.weight > 0.0 && mean.is_finite() {
            out.insert(format!("{name}{MEAN_SUFFIX}"), mean);
        }
    }
    out.insert(COUNTS[0].into(), m.accepted as f64);
    out.insert(COUNTS[1].into(), rejected as f64);
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !COUNTS.contains(&name)
}

/// Of finite values, at least one. Halves are added separately so two
/// values near f64::MAX do not overflow.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        values[n / 2 - 1] / 2.0 + values[n / 2] / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_core::measurements::ClientMeasurement;
    use serde_json::Value;

    /// An accepted client: id, aggregation weight, reported metrics.
    type Client<'a> = (&'a str, f64, Vec<(String, Value)>);

    fn round(clients: &[Client<'_>]) -> BTreeMap<String, f64> {
        let m = Measurements {
            weighting: "examples".into(),
            llm_type: "none".into(),
            target_llm_type: None,
            combiner: "mean".into(),
            accepted: clients.len(),
            rejected: 0,
            excluded: 0,
            clients: clients
                .iter()
                .map(|(id, w, _)| ClientMeasurement {
                    client_id: id.to_string(),
                    status: ClientStatus::Accepted,
                    reason: None,
                    num_examples: Some(1),
                    llm_type: None,
                    quality: None,
                    weight: Some(*w),
                    update_norm: None,
                    scale: None,
                })
                .collect(),
            stages: BTreeMap::new(),
            tensors: 1,
            parameters: 1,
            bytes_read: 0,
            bytes_written: 0,
            passes: 1,
            seconds: 0.0,
        };
        let rows = clients
            .iter()
            .map(|(id, _, metrics)| {
                let row = UpdateRecord {
                    client_id: id.to_string(),
                    job_round: "j#000001".into(),
                    job_id: "j".into(),
                    round: 1,
                    model_key: String::new(),
                    checksum: String::new(),
                    store_checksum: None,
                    num_examples: 1.into(),
                    llm_type: None,
                    metrics: metrics.iter().cloned().collect(),
                    bytes: 0,
                    trained_at: String::new(),
                    schema: None,
                    variate_delta_checksum: None,
                    base_round: None,
                };
                (id.to_string(), row)
            })
            .collect();
        round_metrics(&m, &rows, 1)
    }

    fn acc(v: f64) -> Vec<(String, Value)> {
        vec![("accuracy".into(), v.into())]
    }

    #[test]
    fn median_for_the_name_weighted_mean_beside_it_and_counts() {
        let out = round(&[
            ("a", 0.25, acc(0.5)),
            ("b", 0.25, acc(0.9)),
            ("c", 0.5, acc(0.7)),
        ]);
        assert_eq!(out["accuracy"], 0.7);
        assert!((out["accuracy:mean"] - (0.125 + 0.225 + 0.35)).abs() < 1e-12);
        assert_eq!(out["clients_accepted"], 3.0);
        assert_eq!(out["clients_rejected"], 1.0);
        assert_eq!(out.len(), 4);
        // An even count: the middle two averaged.
        let out = round(&[("a", 0.5, acc(0.2)), ("b", 0.5, acc(0.4))]);
        assert!((out["accuracy"] - 0.3).abs() < 1e-12);
    }

    #[test]
    fn one_outlier_cannot_move_the_median() {
        for outlier in [1e300, f64::MAX, -1e300, 0.0] {
            let out = round(&[
                ("a", 0.3, acc(0.6)),
                ("b", 0.3, acc(0.62)),
                ("evil", 0.4, acc(outlier)),
            ]);
            assert!(
                (0.6..=0.62).contains(&out["accuracy"]),
                "{outlier}: {out:?}"
            );
        }
        // The weighted mean is moved…
        let out = round(&[("a", 0.5, acc(0.6)), ("evil", 0.5, acc(1e300))]);
        assert!(out["accuracy:mean"] > 1e299, "{out:?}");
        // …and left out when its sum overflows (JSON has no infinity).
        let out = round(&[("e1", 1.0, acc(f64::MAX)), ("e2", 1.0, acc(f64::MAX))]);
        assert!(!out.contains_key("accuracy:mean"), "{out:?}");
        assert_eq!(out["accuracy"], f64::MAX);
    }

    #[test]
    fn names_are_bounded_in_number_length_and_alphabet() {
        let junk: Vec<(String, Value)> = (0..1000)
            .map(|i| (format!("junk{i:04}"), Value::from(1.0)))
            .chain([
                ("x".repeat(65), Value::from(1.0)),
                ("a b".into(), Value::from(1.0)),
                ("new\nline".into(), Value::from(1.0)),
                ("clients_accepted".into(), Value::from(1e9)),
                (String::new(), Value::from(1.0)),
                ("accuracy".into(), Value::from(0.99)),
            ])
            .collect();
        let out = round(&[
            ("a", 0.3, acc(0.6)),
            ("b", 0.3, acc(0.62)),
            ("evil", 0.4, junk),
        ]);
        // Everybody's name is kept; the junk fills the rest, in name order.
        assert_eq!(out["accuracy"], 0.62);
        let names: Vec<&String> = out.keys().filter(|k| !k.contains(':')).collect();
        assert_eq!(names.len(), MAX_METRICS + 2, "{names:?}");
        assert!(out.contains_key("junk0000") && !out.contains_key("junk0031"));
        assert!(out
            .keys()
            .all(|k| k.len() <= MAX_NAME_BYTES + MEAN_SUFFIX.len()));
        assert_eq!(out["clients_accepted"], 3.0);
        let max = "y".repeat(MAX_NAME_BYTES);
        let out = round(&[("a", 1.0, vec![(max.clone(), Value::from(2.0))])]);
        assert_eq!(out[&max], 2.0);
    }

    #[test]
    fn non_numeric_and_non_finite_reports_are_skipped() {
        let out = round(&[
            ("a", 0.5, vec![("loss".into(), Value::from("low"))]),
            ("b", 0.5, vec![("loss".into(), Value::Null)]),
        ]);
        assert!(!out.contains_key("loss"), "{out:?}");
    }
}
