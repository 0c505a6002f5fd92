//! The external trainer's report file: strict JSON
//! `{"num_examples": 123, "llm_type": "...", "metrics": {"loss": 0.4}}`.
//! `llm_type` may be null or absent; `metrics` may be absent. Anything
//! else (unknown keys, strings for numbers, NaN) is an error naming the file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::trainer::{TrainError, TrainReport};

/// A report is a few hundred bytes; refuse to read a runaway file.
pub const MAX_REPORT_BYTES: u64 = 1024 * 1024;
pub const MAX_METRICS: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    num_examples: u64,
    #[serde(default)]
    llm_type: Option<String>,
    #[serde(default)]
    metrics: BTreeMap<String, f64>,
}

/// Reads and checks `path`.
pub fn read(path: &Path) -> Result<TrainReport, TrainError> {
    let name = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| {
            TrainError(format!(
                "metrics file {name}: {e} (the trainer must write it)"
            ))
        })?
        .len();
    if len > MAX_REPORT_BYTES {
        return Err(TrainError(format!(
            "metrics file {name} is {len} bytes, more than {MAX_REPORT_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError(format!("metrics file {name}: {e}")))?;
    parse(&text).map_err(|e| TrainError(format!("metrics file {name}: {e}")))
}

/// Parses report text; the error does not name the file (the caller does).
pub fn parse(text: &str) -> Result<TrainReport, String> {
    let raw: RawReport = serde_json::from_str(text).map_err(|e| {
        format!("{e} (expected {{\"num_examples\": int, \"llm_type\": string|null, \"metrics\": {{name: number}}}})")
    })?;
    if raw.num_examples == 0 {
        return Err("num_examples is 0: an update trained on nothing carries no weight".into());
    }
    if let Some(t) = &raw.llm_type {
        check_name("llm_type", t)?;
    }
    if raw.metrics.len() > MAX_METRICS {
        return Err(format!(
            "{} metrics, at most {MAX_METRICS}",
            raw.metrics.len()
        ));
    }
    for (k, v) in &raw.metrics {
        check_name("metric name", k)?;
        if !v.is_finite() {
            return Err(format!("metric {k} is not finite"));
        }
    }
    Ok(TrainReport {
        num_examples: raw.num_examples,
        llm_type: raw.llm_type,
        metrics: raw.metrics,
    })
}

/// Names end up as DynamoDB attribute keys and in operator tables.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{s}` must be 1–64 characters of A–Z a–z 0–9 _ - . /"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_reports() {
        let r = parse(r#"{"num_examples": 10, "llm_type": "SpikingEvoTextLM", "metrics": {"loss": 0.5, "perplexity": 3}}"#).unwrap();
        assert_eq!(r.num_examples, 10);
        assert_eq!(r.metrics["perplexity"], 3.0);
        let r = parse(r#"{"num_examples": 1, "llm_type": null}"#).unwrap();
        assert_eq!(r.llm_type, None);
    }

    #[test]
    fn bad_reports_say_why() {
        for (text, want) in [
            (r#"{"num_examples": 0}"#, "num_examples is 0"),
            (r#"{"num_examples": -3}"#, "num_examples"),
            (r#"{"num_examples": "12"}"#, "expected"),
            (r#"{"num_examples": 2, "extra": 1}"#, "extra"),
            (
                r#"{"num_examples": 2, "metrics": {"loss": "low"}}"#,
                "expected",
            ),
            (
                r#"{"num_examples": 2, "metrics": {"loss": NaN}}"#,
                "expected",
            ),
            (r#"{"num_examples": 2, "llm_type": "a b"}"#, "llm_type"),
            (r#"{"metrics": {}}"#, "num_examples"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
