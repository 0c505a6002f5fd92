//! Turning client claims into aggregation weights.
//!
//! Order of checks, for every update: `num_examples` must be a whole number
//! in 1..=cap and every metric a finite number (else: rejected); then the
//! round's target `llm_type` is chosen and updates of other types are
//! excluded (recorded, not silently dropped); then each remaining update gets
//! its weight — `examples`: num_examples; `uniform`: 1; `quality`:
//! num_examples × the type's quality multiplier (see `quality.rs`),
//! whose metric checks may reject it too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::limits::Limits;
use crate::quality;
use crate::update_meta::UpdateMeta;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// Classic FedAvg: weight = num_examples.
    #[default]
    Examples,
    /// Every client counts the same.
    Uniform,
    /// Type-aware: num_examples × quality(llm_type, metrics).
    Quality,
}

/// Which `llm_type` a round aggregates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TypeFilter {
    /// Type-blind: every update takes part whatever its type.
    #[default]
    None,
    /// The most common type among the valid updates; ties go to the type
    /// with more examples in total, then to the smaller name.
    Auto,
    /// Exactly this type.
    Exact(String),
}

impl TypeFilter {
    pub fn parse(s: &str) -> TypeFilter {
        match s {
            "none" => TypeFilter::None,
            "auto" => TypeFilter::Auto,
            other => TypeFilter::Exact(other.to_string()),
        }
    }
}

/// What happened to one update.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Takes part with this (unnormalized) weight.
    Weighted(f64),
    /// Broken claims or model: the reason names the rule.
    Rejected(String),
    /// Valid, but not of the round's target type.
    Excluded(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightEntry {
    pub num_examples: Option<u64>,
    /// The quality multiplier when `quality` weighting applied one.
    pub multiplier: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightPlan {
    /// The chosen type when filtering by type.
    pub target_type: Option<String>,
    /// One entry per input update, same order.
    pub entries: Vec<WeightEntry>,
}

/// The name an update's type goes by when choosing the target type; updates
/// without a type form their own group.
const UNTYPED: &str = "(untyped)";

pub fn plan(
    metas: &[UpdateMeta],
    weighting: Weighting,
    filter: &TypeFilter,
    limits: &Limits,
) -> Result<WeightPlan, String> {
    let mut entries: Vec<WeightEntry> = metas
        .iter()
        .map(|m| match check_claims(m, limits) {
            Ok(n) => WeightEntry {
                num_examples: Some(n),
                multiplier: None,
                verdict: Verdict::Weighted(0.0),
            },
            Err(reason) => WeightEntry {
                num_examples: None,
                multiplier: None,
                verdict: Verdict::Rejected(reason),
            },
        })
        .collect();

    let type_of = |m: &UpdateMeta| m.llm_type.clone().unwrap_or_else(|| UNTYPED.to_string());
    let target = match filter {
        TypeFilter::None => None,
        TypeFilter::Exact(t) => Some(t.clone()),
        TypeFilter::Auto => {
            // type → (count, total examples)
            let mut groups: BTreeMap<String, (usize, u64)> = BTreeMap::new();
            for (m, e) in metas.iter().zip(&entries) {
                if let Some(n) = e.num_examples {
                    let g = groups.entry(type_of(m)).or_default();
                    g.0 += 1;
                    g.1 += n;
                }
            }
            // BTreeMap iterates names in order, and max_by keeps the last of
            // equals, so compare names reversed to let the smaller win ties.
            groups
                .into_iter()
                .max_by(|a, b| (a.1 .0, a.1 .1).cmp(&(b.1 .0, b.1 .1)).then(b.0.cmp(&a.0)))
                .map(|(t, _)| t)
        }
    };

    if let Some(t) = &target {
        let mut any = false;
        for (m, e) in metas.iter().zip(entries.iter_mut()) {
            if e.num_examples.is_none() {
                continue;
            }
            let theirs = type_of(m);
            if &theirs == t {
                any = true;
            } else {
                e.verdict = Verdict::Excluded(format!(
                    "llm_type `{theirs}` is not this round's target type `{t}`"
                ));
            }
        }
        if !any {
            let present: std::collections::BTreeSet<String> = metas.iter().map(type_of).collect();
            return Err(format!(
                "no valid update of the target llm_type `{t}` (types present: {})",
                present.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }

    for (m, e) in metas.iter().zip(entries.iter_mut()) {
        let (Some(n), Verdict::Weighted(_)) = (e.num_examples, &e.verdict) else {
            continue;
        };
        e.verdict = match weighting {
            Weighting::Examples => Verdict::Weighted(n as f64),
            Weighting::Uniform => Verdict::Weighted(1.0),
            Weighting::Quality => match quality::multiplier(m.llm_type.as_deref(), &m.metrics) {
                Ok(Some(q)) => {
                    e.multiplier = Some(q);
                    Verdict::Weighted(n as f64 * q)
                }
                Ok(None) => Verdict::Weighted(n as f64),
                Err(reason) => Verdict::Rejected(reason),
            },
        };
    }

    Ok(WeightPlan {
        target_type: target,
        entries,
    })
}

/// Checks the claims every update must make sensibly, whatever the weighting.
fn check_claims(m: &UpdateMeta, limits: &Limits) -> Result<u64, String> {
    let n = match &m.num_examples {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u
            } else if let Some(i) = n.as_i64() {
                return Err(format!("num_examples is {i}, but must be at least 1"));
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() != 0.0 || f < 1.0 || f > u64::MAX as f64 {
                    return Err(format!(
                        "num_examples is {f}, but must be a whole number ≥ 1"
                    ));
                }
                f as u64
            }
        }
        other => return Err(format!("num_examples is not a number: {other}")),
    };
    if n == 0 {
        return Err("num_examples is 0, but must be at least 1".into());
    }
    if n > limits.max_num_examples {
        return Err(format!(
            "num_examples {n} exceeds the cap of {} (limits.max_num_examples)",
            limits.max_num_examples
        ));
    }
    quality::check_all_numeric(&m.metrics)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(p: &WeightPlan) -> Vec<Option<f64>> {
        p.entries
            .iter()
            .map(|e| match e.verdict {
                Verdict::Weighted(w) => Some(w),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn examples_and_uniform() {
        let metas = vec![UpdateMeta::new("a", 10), UpdateMeta::new("b", 30)];
        let l = Limits::default();
        let p = plan(&metas, Weighting::Examples, &TypeFilter::None, &l).unwrap();
        assert_eq!(weights(&p), vec![Some(10.0), Some(30.0)]);
        let p = plan(&metas, Weighting::Uniform, &TypeFilter::None, &l).unwrap();
        assert_eq!(weights(&p), vec![Some(1.0), Some(1.0)]);
    }

    #[test]
    fn bad_counts_are_rejected_with_reasons() {
        let mut metas = vec![
            UpdateMeta::new("zero", 0),
            UpdateMeta::new("huge", 1_000_000_000_000),
            UpdateMeta::new("ok", 5),
            UpdateMeta::new("neg", 1),
            UpdateMeta::new("frac", 1),
            UpdateMeta::new("text", 1),
        ];
        metas[3].num_examples = Value::from(-4);
        metas[4].num_examples = Value::from(2.5);
        metas[5].num_examples = Value::from("many");
        let p = plan(
            &metas,
            Weighting::Examples,
            &TypeFilter::None,
            &Limits::default(),
        )
        .unwrap();
        let reasons: Vec<String> = p
            .entries
            .iter()
            .map(|e| match &e.verdict {
                Verdict::Rejected(r) => r.clone(),
                v => format!("{v:?}"),
            })
            .collect();
        assert!(reasons[0].contains("is 0"), "{}", reasons[0]);
        assert!(reasons[1].contains("exceeds the cap"), "{}", reasons[1]);
        assert_eq!(reasons[2], "Weighted(5.0)");
        assert!(reasons[3].contains("-4"), "{}", reasons[3]);
        assert!(reasons[4].contains("whole number"), "{}", reasons[4]);
        assert!(reasons[5].contains("not a number"), "{}", reasons[5]);
    }

    #[test]
    fn quality_weighting_multiplies_examples() {
        let metas = vec![
            UpdateMeta::new("t", 100)
                .with_type("SpikingEvoTextLM")
                .with_metric("perplexity", std::f64::consts::E)
                .with_metric("loss", 1.0),
            UpdateMeta::new("v", 10)
                .with_type("SpikingEvoVisionEncoder")
                .with_metric("object_detection_accuracy", 1.0),
            UpdateMeta::new("plain", 7),
            UpdateMeta::new("broken", 7).with_type("SpikingEvoTextLM"),
        ];
        let p = plan(
            &metas,
            Weighting::Quality,
            &TypeFilter::None,
            &Limits::default(),
        )
        .unwrap();
        let w = weights(&p);
        assert!((w[0].unwrap() - 50.0).abs() < 1e-9);
        assert!((w[1].unwrap() - 14.0).abs() < 1e-9);
        assert_eq!(w[2], Some(7.0));
        assert_eq!(w[3], None);
        assert!(matches!(&p.entries[3].verdict, Verdict::Rejected(r) if r.contains("perplexity")));
    }

    #[test]
    fn auto_picks_the_most_common_type_and_breaks_ties() {
        let l = Limits::default();
        let metas = vec![
            UpdateMeta::new("a", 1).with_type("B"),
            UpdateMeta::new("b", 1).with_type("B"),
            UpdateMeta::new("c", 100).with_type("A"),
        ];
        let p = plan(&metas, Weighting::Examples, &TypeFilter::Auto, &l).unwrap();
        assert_eq!(p.target_type.as_deref(), Some("B"));
        assert!(matches!(&p.entries[2].verdict, Verdict::Excluded(r) if r.contains("`A`")));
        // Tie on count → more examples wins.
        let metas = vec![
            UpdateMeta::new("a", 1).with_type("B"),
            UpdateMeta::new("c", 5).with_type("A"),
        ];
        let p = plan(&metas, Weighting::Examples, &TypeFilter::Auto, &l).unwrap();
        assert_eq!(p.target_type.as_deref(), Some("A"));
        // Tie on count and examples → smaller name wins.
        let metas = vec![
            UpdateMeta::new("a", 5).with_type("B"),
            UpdateMeta::new("c", 5).with_type("A"),
        ];
        let p = plan(&metas, Weighting::Examples, &TypeFilter::Auto, &l).unwrap();
        assert_eq!(p.target_type.as_deref(), Some("A"));
        // Rejected updates do not vote.
        let metas = vec![
            UpdateMeta::new("a", 0).with_type("B"),
            UpdateMeta::new("b", 0).with_type("B"),
            UpdateMeta::new("c", 5).with_type("A"),
        ];
        let p = plan(&metas, Weighting::Examples, &TypeFilter::Auto, &l).unwrap();
        assert_eq!(p.target_type.as_deref(), Some("A"));
    }

    #[test]
    fn no_update_of_the_target_type_is_an_error() {
        let metas = vec![UpdateMeta::new("a", 1).with_type("B")];
        let err = plan(
            &metas,
            Weighting::Examples,
            &TypeFilter::Exact("A".into()),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            err.contains("target llm_type `A`") && err.contains("B"),
            "{err}"
        );
    }
}
