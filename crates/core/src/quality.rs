//! Type-aware quality: how much a client's reported metrics should scale its
//! example count, per model type (`llm_type`). The formulas are fixed by the
//! design (docs/design.md §4); each is a pure function of validated metrics.
//!
//! Missing optional metrics count as 0 (the most conservative value: they add
//! nothing to the bonus). Missing required metrics, non-numeric or NaN values,
//! and out-of-range values reject the update.

use std::collections::BTreeMap;

use serde_json::Value;

/// The model types fedstep knows how to weigh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlmType {
    SpikingEvoTextLM,
    SpikingEvoMultiModalLM,
    SpikingEvoVisionEncoder,
    SpikingEvoAudioEncoder,
}

impl LlmType {
    pub const ALL: [LlmType; 4] = [
        LlmType::SpikingEvoTextLM,
        LlmType::SpikingEvoMultiModalLM,
        LlmType::SpikingEvoVisionEncoder,
        LlmType::SpikingEvoAudioEncoder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LlmType::SpikingEvoTextLM => "SpikingEvoTextLM",
            LlmType::SpikingEvoMultiModalLM => "SpikingEvoMultiModalLM",
            LlmType::SpikingEvoVisionEncoder => "SpikingEvoVisionEncoder",
            LlmType::SpikingEvoAudioEncoder => "SpikingEvoAudioEncoder",
        }
    }

    pub fn parse(name: &str) -> Option<LlmType> {
        LlmType::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The multiplier applied to `num_examples` for a known type, or `None` for
/// an unknown or missing type (which gets the plain FedAvg weight).
///
/// Text and multimodal types return a quality in [0, 1] that multiplies the
/// example count; vision and audio return 1 + score in [1, 2], per the design.
pub fn multiplier(
    llm_type: Option<&str>,
    metrics: &BTreeMap<String, Value>,
) -> Result<Option<f64>, String> {
    let Some(t) = llm_type.and_then(LlmType::parse) else {
        return Ok(None);
    };
    let m = Metrics(metrics);
    let value = match t {
        LlmType::SpikingEvoTextLM => {
            let perplexity = m.required("perplexity")?;
            if perplexity < 1.0 {
                return Err(format!(
                    "metric `perplexity` is {perplexity}, but perplexity is at least 1"
                ));
            }
            let loss = m.required("loss")?;
            if loss < 0.0 {
                return Err(format!("metric `loss` is {loss}, but a loss is at least 0"));
            }
            let ppl_score = 1.0 / (1.0 + perplexity.ln());
            let loss_score = 1.0 / (1.0 + loss);
            (ppl_score + loss_score) / 2.0
        }
        LlmType::SpikingEvoMultiModalLM => {
            let text = m.accuracy("text_accuracy", true)?;
            let image = m.accuracy("image_accuracy", true)?;
            let audio = m.accuracy("audio_accuracy", true)?;
            let min = text.min(image).min(audio);
            let mean = (text + image + audio) / 3.0;
            // Harmonic mean of the weakest modality and the average; all
            // zeros is a model that learned nothing, so it weighs nothing.
            if min + mean == 0.0 {
                0.0
            } else {
                2.0 * min * mean / (min + mean)
            }
        }
        LlmType::SpikingEvoVisionEncoder => {
            let od = m.accuracy("object_detection_accuracy", true)?;
            let edge = m.accuracy("edge_detection_accuracy", false)?;
            let ic = m.accuracy("image_classification_accuracy", false)?;
            1.0 + 0.4 * od + 0.3 * edge + 0.3 * ic
        }
        LlmType::SpikingEvoAudioEncoder => {
            let sr = m.accuracy("speech_recognition_accuracy", true)?;
            let wer = m.required("word_error_rate")?;
            if wer < 0.0 {
                return Err(format!(
                    "metric `word_error_rate` is {wer}, but an error rate is at least 0"
                ));
            }
            let noise = m.accuracy("noise_robustness", false)?;
            let wer_score = 1.0 - wer.min(1.0);
            1.0 + 0.5 * sr + 0.3 * wer_score + 0.2 * noise
        }
    };
    Ok(Some(value))
}

struct Metrics<'a>(&'a BTreeMap<String, Value>);

impl Metrics<'_> {
    fn get(&self, name: &str) -> Result<Option<f64>, String> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(format!("metric `{name}` is not a finite number")),
            },
            Some(other) => Err(format!("metric `{name}` is not a number: {other}")),
        }
    }

    fn required(&self, name: &str) -> Result<f64, String> {
        self.get(name)?
            .ok_or_else(|| format!("required metric `{name}` is missing"))
    }

    fn accuracy(&self, name: &str, required: bool) -> Result<f64, String> {
        let v = if required {
            self.required(name)?
        } else {
            match self.get(name)? {
                Some(v) => v,
                None => return Ok(0.0),
            }
        };
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("metric `{name}` is {v}, outside [0, 1]"));
        }
        Ok(v)
    }
}

/// Every metric value must be a finite number, whatever the type; a client
/// that reports `"loss": "low"` is broken and its update is not trusted.
pub fn check_all_numeric(metrics: &BTreeMap<String, Value>) -> Result<(), String> {
    let m = Metrics(metrics);
    for name in metrics.keys() {
        m.get(name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn text_lm_worked_example() {
        // perplexity e → ln = 1 → ppl_score 1/2; loss 1 → loss_score 1/2.
        let q = multiplier(
            Some("SpikingEvoTextLM"),
            &metrics(&[("perplexity", std::f64::consts::E), ("loss", 1.0)]),
        )
        .unwrap()
        .unwrap();
        assert!(close(q, 0.5), "{q}");
        // perplexity 1 → ppl_score 1; loss 0 → loss_score 1.
        let q = multiplier(
            Some("SpikingEvoTextLM"),
            &metrics(&[("perplexity", 1.0), ("loss", 0.0)]),
        )
        .unwrap()
        .unwrap();
        assert!(close(q, 1.0));
        // perplexity 20, loss 3: (1/(1+ln 20) + 1/4)/2 = (0.2502670... + 0.25)/2
        let q = multiplier(
            Some("SpikingEvoTextLM"),
            &metrics(&[("perplexity", 20.0), ("loss", 3.0)]),
        )
        .unwrap()
        .unwrap();
        assert!(close(q, (1.0 / (1.0 + 20f64.ln()) + 0.25) / 2.0));
        assert!(close(q, 0.250_133_508_896_299_7), "{q}");
    }

    #[test]
    fn multimodal_worked_example() {
        // min 0.6, mean 0.8 → 2·0.48/1.4 = 0.685714...
        let q = multiplier(
            Some("SpikingEvoMultiModalLM"),
            &metrics(&[
                ("text_accuracy", 0.9),
                ("image_accuracy", 0.6),
                ("audio_accuracy", 0.9),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(close(q, 0.96 / 1.4), "{q}");
        let zero = multiplier(
            Some("SpikingEvoMultiModalLM"),
            &metrics(&[
                ("text_accuracy", 0.0),
                ("image_accuracy", 0.0),
                ("audio_accuracy", 0.0),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(zero, 0.0);
    }

    #[test]
    fn vision_worked_example_and_optional_metrics() {
        // v = 0.4·0.5 + 0.3·1.0 + 0.3·0.0 = 0.5 → 1.5
        let full = multiplier(
            Some("SpikingEvoVisionEncoder"),
            &metrics(&[
                ("object_detection_accuracy", 0.5),
                ("edge_detection_accuracy", 1.0),
                ("image_classification_accuracy", 0.0),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(close(full, 1.5));
        // Missing optional metrics count as 0.
        let only_required = multiplier(
            Some("SpikingEvoVisionEncoder"),
            &metrics(&[("object_detection_accuracy", 0.5)]),
        )
        .unwrap()
        .unwrap();
        assert!(close(only_required, 1.2));
    }

    #[test]
    fn audio_worked_example() {
        // wer 0.2 → 0.8; s = 0.5·0.9 + 0.3·0.8 + 0.2·0.5 = 0.79 → 1.79
        let q = multiplier(
            Some("SpikingEvoAudioEncoder"),
            &metrics(&[
                ("speech_recognition_accuracy", 0.9),
                ("word_error_rate", 0.2),
                ("noise_robustness", 0.5),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(close(q, 1.79), "{q}");
        // WER above 1 is capped: score 0. Missing noise_robustness counts 0.
        let q = multiplier(
            Some("SpikingEvoAudioEncoder"),
            &metrics(&[
                ("speech_recognition_accuracy", 1.0),
                ("word_error_rate", 3.0),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(close(q, 1.5));
    }

    #[test]
    fn unknown_or_missing_type_is_plain_fedavg() {
        assert_eq!(multiplier(None, &BTreeMap::new()).unwrap(), None);
        assert_eq!(multiplier(Some("GPT-9"), &BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn rejections_name_the_metric_and_rule() {
        let cases: Vec<(&str, BTreeMap<String, Value>, &str)> = vec![
            (
                "SpikingEvoTextLM",
                metrics(&[("loss", 1.0)]),
                "required metric `perplexity` is missing",
            ),
            (
                "SpikingEvoTextLM",
                metrics(&[("perplexity", 0.5), ("loss", 1.0)]),
                "at least 1",
            ),
            (
                "SpikingEvoTextLM",
                metrics(&[("perplexity", 2.0), ("loss", -1.0)]),
                "`loss`",
            ),
            (
                "SpikingEvoMultiModalLM",
                metrics(&[
                    ("text_accuracy", 1.2),
                    ("image_accuracy", 0.5),
                    ("audio_accuracy", 0.5),
                ]),
                "`text_accuracy` is 1.2, outside [0, 1]",
            ),
            (
                "SpikingEvoVisionEncoder",
                metrics(&[("edge_detection_accuracy", 0.5)]),
                "object_detection_accuracy",
            ),
            (
                "SpikingEvoVisionEncoder",
                metrics(&[
                    ("object_detection_accuracy", 0.5),
                    ("edge_detection_accuracy", -0.1),
                ]),
                "outside [0, 1]",
            ),
            (
                "SpikingEvoAudioEncoder",
                metrics(&[("speech_recognition_accuracy", 0.5)]),
                "word_error_rate",
            ),
        ];
        for (t, m, want) in cases {
            let err = multiplier(Some(t), &m).unwrap_err();
            assert!(err.contains(want), "{t}: `{err}` should contain `{want}`");
        }
        let mut text = BTreeMap::new();
        text.insert("loss".to_string(), Value::from("low"));
        text.insert("perplexity".to_string(), Value::from(2.0));
        let err = multiplier(Some("SpikingEvoTextLM"), &text).unwrap_err();
        assert!(err.contains("not a number"), "{err}");
        assert!(check_all_numeric(&text).is_err());
    }
}
