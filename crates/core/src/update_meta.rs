//! What a client claims about its update, as sent. Claims stay loosely typed
//! (`serde_json::Value`) until the weighting stage validates them, so that a
//! client sending `"num_examples": "many"` gets its own update rejected with
//! a reason instead of failing the whole round's manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bytes::Input;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpdateMeta {
    pub client_id: String,
    pub num_examples: Value,
    #[serde(default)]
    pub llm_type: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, Value>,
}

impl UpdateMeta {
    /// A well-formed claim, for callers that build updates in code.
    pub fn new(client_id: impl Into<String>, num_examples: u64) -> Self {
        UpdateMeta {
            client_id: client_id.into(),
            num_examples: Value::from(num_examples),
            llm_type: None,
            metrics: BTreeMap::new(),
        }
    }
    pub fn with_type(mut self, llm_type: &str) -> Self {
        self.llm_type = Some(llm_type.to_string());
        self
    }
    pub fn with_metric(mut self, name: &str, value: f64) -> Self {
        self.metrics.insert(name.to_string(), Value::from(value));
        self
    }
}

/// An update's bytes (a local file, an S3 object) with its claims.
#[derive(Debug, Clone)]
pub struct UpdateSource {
    pub input: Input,
    pub meta: UpdateMeta,
}

impl UpdateSource {
    /// An update in a local file.
    pub fn file(path: impl Into<PathBuf>, meta: UpdateMeta) -> UpdateSource {
        UpdateSource {
            input: Input::file(path),
            meta,
        }
    }
}

/// `ROUND.json` for `fedstep aggregate`:
/// `{"updates": [{"path": ..., "num_examples": ..., "llm_type"?, "metrics"?, "client_id"?}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    updates: Vec<ManifestEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestEntry {
    path: PathBuf,
    num_examples: Value,
    #[serde(default)]
    llm_type: Option<String>,
    #[serde(default)]
    metrics: BTreeMap<String, Value>,
    #[serde(default)]
    client_id: Option<String>,
}

/// Parses a manifest. Relative update paths are resolved against the
/// manifest's directory so that a manifest and its files can move together.
/// A missing `client_id` becomes the file stem; duplicate ids are an error
/// (the measurements are keyed by client).
pub fn parse_manifest(text: &str, base_dir: &Path) -> Result<Vec<UpdateSource>, String> {
    let file: ManifestFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if file.updates.is_empty() {
        return Err("`updates` is empty: nothing to aggregate".into());
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(file.updates.len());
    for (i, e) in file.updates.into_iter().enumerate() {
        let path = if e.path.is_absolute() {
            e.path
        } else {
            base_dir.join(e.path)
        };
        let client_id = match e.client_id {
            Some(id) if !id.is_empty() => id,
            Some(_) => return Err(format!("updates[{i}]: client_id is empty")),
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("update-{i}")),
        };
        if !seen.insert(client_id.clone()) {
            return Err(format!(
                "updates[{i}]: client_id `{client_id}` appears twice (one update per client per round)"
            ));
        }
        out.push(UpdateSource::file(
            path,
            UpdateMeta {
                client_id,
                num_examples: e.num_examples,
                llm_type: e.llm_type,
                metrics: e.metrics,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_relative_to_the_manifest_and_defaults_ids() {
        let text = r#"{"updates": [
            {"path": "a.safetensors", "num_examples": 120, "llm_type": "SpikingEvoTextLM",
             "metrics": {"loss": 0.1}, "client_id": "site-a"},
            {"path": "/abs/b.safetensors", "num_examples": 80}
        ]}"#;
        let u = parse_manifest(text, Path::new("/round")).unwrap();
        assert_eq!(u[0].input.source().describe(), "/round/a.safetensors");
        assert_eq!(u[0].meta.client_id, "site-a");
        assert_eq!(u[0].meta.metrics["loss"], Value::from(0.1));
        assert_eq!(u[1].meta.client_id, "b");
        assert_eq!(u[1].meta.llm_type, None);
    }

    #[test]
    fn rejects_duplicates_unknown_keys_and_empty_lists() {
        let dup = r#"{"updates": [{"path": "x", "num_examples": 1, "client_id": "a"},
                                  {"path": "y", "num_examples": 1, "client_id": "a"}]}"#;
        assert!(parse_manifest(dup, Path::new("."))
            .unwrap_err()
            .contains("appears twice"));
        let unknown = r#"{"updates": [{"path": "x", "num_example": 1}]}"#;
        assert!(parse_manifest(unknown, Path::new(".")).is_err());
        assert!(parse_manifest(r#"{"updates": []}"#, Path::new("."))
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn keeps_bad_claims_for_per_update_rejection() {
        let text =
            r#"{"updates": [{"path": "x", "num_examples": "many", "metrics": {"loss": "low"}}]}"#;
        let u = parse_manifest(text, Path::new(".")).unwrap();
        assert_eq!(u[0].meta.num_examples, Value::from("many"));
    }
}
