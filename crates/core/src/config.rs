//! The aggregation pipeline's configuration, checked when it is parsed.
//!
//! ```toml
//! weighting = "quality"        # examples (default) | uniform | quality
//! max_client_share = 0.25      # optional: no client's share of the round's
//!                              # weight exceeds this (see `share_cap`)
//! type_filter = "auto"         # which llm_type a round aggregates: none
//!                              # (default, type-blind) | auto | <type name>;
//!                              # `llm_type` is accepted as its old name
//! memory_budget_mb = 8         # block buffers across all inputs (cache-sized)
//! personalization = "none"     # none (default) | fedselect (masked updates,
//!                              # see `personalization`; needs a global model;
//!                              # refuses median/trimmed_mean/krum/dp_noise)
//!
//! [limits]                     # bounds on untrusted input (all optional)
//! max_header_bytes = 16777216
//! max_tensors = 100000
//! max_num_examples = 1000000000
//!
//! [[stages]]                   # applied in order; see `stages` for each kind
//! kind = "clip"
//! max_norm = 10.0
//! ```
//!
//! A [`PipelineConfig`] cannot exist unchecked: deserializing it (TOML or
//! JSON) parses every stage table, builds the pipeline and runs every check,
//! and its fields are read-only. It serializes back to the shape it was
//! written in, so a job stored as JSON round-trips.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::limits::Limits;
use crate::personalization::{self, Personalization};
use crate::share_cap::MaxClientShare;
use crate::stages::{Pipeline, StageTable};
use crate::weighting::{TypeFilter, Weighting};

/// The configuration as written, before any check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipelineConfig {
    #[serde(default)]
    weighting: Weighting,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_client_share: Option<MaxClientShare>,
    /// The rows' claim it filters on is `llm_type`, which users wrote here
    /// too before the key was named for what it is.
    #[serde(default = "default_type_filter", alias = "llm_type")]
    type_filter: String,
    #[serde(default = "default_budget_mb")]
    memory_budget_mb: u64,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    personalization: Personalization,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stages: Vec<StageTable>,
}

fn default_type_filter() -> String {
    "none".into()
}

/// Block buffers for all inputs together. Small on purpose: blocks of a few
/// hundred KB per input stay in the core's L2 cache between the read and the
/// combine, which measured ~2× faster than 64 MB on 8 × 100 MB inputs.
fn default_budget_mb() -> u64 {
    8
}

/// A checked pipeline configuration, its stages built.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawPipelineConfig", into = "RawPipelineConfig")]
pub struct PipelineConfig {
    raw: RawPipelineConfig,
    type_filter: TypeFilter,
    /// Shared: a config is cloned per job and per round, the stages are
    /// immutable once built.
    pipeline: Arc<Pipeline>,
}

impl PartialEq for PipelineConfig {
    /// Equal when written the same (the pipeline is built from it).
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl TryFrom<RawPipelineConfig> for PipelineConfig {
    type Error = String;

    fn try_from(raw: RawPipelineConfig) -> Result<Self, String> {
        if raw.type_filter.is_empty() {
            return Err("type_filter is empty: use \"none\", \"auto\" or a type name".into());
        }
        if raw.memory_budget_mb == 0 {
            return Err("memory_budget_mb must be at least 1".into());
        }
        if raw.limits.max_num_examples == 0 {
            return Err("limits.max_num_examples must be at least 1".into());
        }
        let pipeline = Pipeline::build(&raw.stages)?;
        if raw.personalization == Personalization::Fedselect {
            personalization::check_pipeline(&pipeline)?;
        }
        Ok(PipelineConfig {
            type_filter: TypeFilter::parse(&raw.type_filter),
            raw,
            pipeline: Arc::new(pipeline),
        })
    }
}

impl From<PipelineConfig> for RawPipelineConfig {
    fn from(cfg: PipelineConfig) -> Self {
        cfg.raw
    }
}

impl Default for PipelineConfig {
    /// Type-blind FedAvg weighted by examples.
    fn default() -> Self {
        PipelineConfig::from_toml("").expect("the default configuration is valid")
    }
}

impl PipelineConfig {
    /// Parses and checks a pipeline TOML; errors say which key is wrong.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The same configuration with `personalization` set, checked again
    /// (FedSelect refuses some stages).
    pub fn with_personalization(&self, p: Personalization) -> Result<Self, String> {
        let mut raw = self.raw.clone();
        raw.personalization = p;
        PipelineConfig::try_from(raw)
    }

    /// The same configuration whose global model moves only `rate` of the
    /// way from the old global model to the pipeline's result: FedBuff's
    /// server learning rate η, as a last stage of server SGD (`fedavgm`
    /// without momentum, which keeps no state). `rate` = 1 is the
    /// configuration itself. A pipeline with a server optimizer of its own
    /// is refused: its `learning_rate` is the one to set.
    pub fn with_server_learning_rate(&self, rate: f64) -> Result<Self, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("server_learning_rate must be positive, got {rate}"));
        }
        if rate == 1.0 {
            return Ok(self.clone());
        }
        if let Some(optimizer) = &self.pipeline.optimizer {
            return Err(format!(
                "server_learning_rate with a `{}` stage: set that stage's learning_rate instead",
                optimizer.kind()
            ));
        }
        let mut raw = self.raw.clone();
        let mut stage = StageTable::new();
        stage.insert("kind".into(), "fedavgm".into());
        stage.insert("learning_rate".into(), rate.into());
        stage.insert("momentum".into(), 0.0.into());
        raw.stages.push(stage);
        PipelineConfig::try_from(raw)
    }

    pub fn weighting(&self) -> Weighting {
        self.raw.weighting
    }

    /// Caps any one client's normalized share of the weight (None: no cap).
    pub fn max_client_share(&self) -> Option<MaxClientShare> {
        self.raw.max_client_share
    }

    /// Which `llm_type` a round aggregates.
    pub fn type_filter(&self) -> TypeFilter {
        self.type_filter.clone()
    }

    /// The `type_filter` key as written ("none", "auto" or a type name).
    pub fn type_filter_name(&self) -> &str {
        &self.raw.type_filter
    }

    pub fn memory_budget_mb(&self) -> u64 {
        self.raw.memory_budget_mb
    }

    pub fn limits(&self) -> &Limits {
        &self.raw.limits
    }

    /// `fedselect`: updates may keep elements personal (masked mean).
    pub fn personalization(&self) -> Personalization {
        self.raw.personalization
    }

    /// The built, checked stages.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    #[cfg(test)]
    pub(crate) fn pipeline_arc(&self) -> Arc<Pipeline> {
        Arc::clone(&self.pipeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_type_blind_fedavg() {
        let cfg = PipelineConfig::from_toml("").unwrap();
        assert_eq!(cfg.weighting(), Weighting::Examples);
        assert_eq!(cfg.type_filter(), TypeFilter::None);
        assert_eq!(cfg.max_client_share(), None);
        assert!(cfg.pipeline().transforms.is_empty());
        assert_eq!(cfg.pipeline().combiner_name(), "mean");
        assert_eq!(cfg, PipelineConfig::default());
    }

    #[test]
    fn max_client_share_is_a_fraction_checked_when_parsed() {
        let cfg = PipelineConfig::from_toml("max_client_share = 0.25").unwrap();
        assert_eq!(cfg.max_client_share().map(|s| s.get()), Some(0.25));
        // A whole 1 is the loosest cap (TOML writes it as an integer).
        let cfg = PipelineConfig::from_toml("max_client_share = 1").unwrap();
        assert_eq!(cfg.max_client_share().map(|s| s.get()), Some(1.0));
        for bad in ["0", "0.0", "-0.25", "1.5", "nan", "inf", "\"a quarter\""] {
            let err = PipelineConfig::from_toml(&format!("max_client_share = {bad}")).unwrap_err();
            assert!(err.contains("max_client_share"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_server_learning_rate_is_a_last_stage_of_server_sgd() {
        let cfg = PipelineConfig::from_toml("[[stages]]\nkind = \"clip\"\nmax_norm = 1.0").unwrap();
        assert_eq!(cfg.with_server_learning_rate(1.0).unwrap(), cfg);
        let stepped = cfg.with_server_learning_rate(0.5).unwrap();
        let optimizer = stepped.pipeline().optimizer.as_ref().unwrap();
        assert_eq!(optimizer.kind(), "fedavgm");
        assert!(optimizer.state().is_none(), "server SGD keeps no state");
        assert_eq!(stepped.pipeline().transforms.len(), 1);
        for bad in [0.0, -0.5, f64::INFINITY, f64::NAN] {
            let err = cfg.with_server_learning_rate(bad).unwrap_err();
            assert!(err.contains("must be positive"), "{bad}: {err}");
        }
        let adam = PipelineConfig::from_toml("[[stages]]\nkind = \"fedadam\"").unwrap();
        let err = adam.with_server_learning_rate(0.5).unwrap_err();
        assert!(
            err.contains("`fedadam`") && err.contains("learning_rate"),
            "{err}"
        );
        // Rebuilt from what it writes, it is the same pipeline.
        let again: PipelineConfig =
            serde_json::from_value(serde_json::to_value(&stepped).unwrap()).unwrap();
        assert_eq!(again, stepped);
    }

    const FULL: &str = r#"
        weighting = "quality"
        type_filter = "SpikingEvoTextLM"
        max_client_share = 0.5
        [limits]
        max_num_examples = 5000
        [[stages]]
        kind = "zeroing"
        max_norm = 100.0
        [[stages]]
        kind = "clip"
        max_norm = 1
        [[stages]]
        kind = "dp_noise"
        noise_multiplier = 0.5
        seed = 7
        [[stages]]
        kind = "fedadam"
        learning_rate = 0.1
        "#;

    #[test]
    fn parses_a_full_pipeline() {
        let cfg = PipelineConfig::from_toml(FULL).unwrap();
        assert_eq!(cfg.weighting(), Weighting::Quality);
        assert_eq!(
            cfg.type_filter(),
            TypeFilter::Exact("SpikingEvoTextLM".into())
        );
        assert_eq!(cfg.limits().max_num_examples, 5000);
        let p = cfg.pipeline();
        assert_eq!(
            p.stages().count(),
            5,
            "two transforms, the mean, noise, optimizer"
        );
        assert!(p.noise.is_some() && p.optimizer.is_some());
    }

    #[test]
    fn llm_type_is_the_old_name_of_type_filter() {
        let old = PipelineConfig::from_toml("llm_type = \"auto\"").unwrap();
        let new = PipelineConfig::from_toml("type_filter = \"auto\"").unwrap();
        assert_eq!(old, new);
        assert_eq!(old.type_filter(), TypeFilter::Auto);
        let err =
            PipelineConfig::from_toml("llm_type = \"auto\"\ntype_filter = \"auto\"").unwrap_err();
        assert!(err.contains("type_filter"), "{err}");
        let err = PipelineConfig::from_toml("type_filter = \"\"").unwrap_err();
        assert!(err.contains("type_filter is empty"), "{err}");
    }

    #[test]
    fn json_round_trips_and_toml_tables_convert() {
        let cfg = PipelineConfig::from_toml(FULL).unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(json["type_filter"], "SpikingEvoTextLM");
        assert_eq!(json["stages"][1]["kind"], "clip");
        let back: PipelineConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        // A job's `[aggregation]` table, stored as JSON.
        let table: toml::Table = toml::from_str(FULL).unwrap();
        let from_table: PipelineConfig =
            serde_json::from_value(serde_json::to_value(&table).unwrap()).unwrap();
        assert_eq!(from_table, cfg);
        // And back to TOML.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(PipelineConfig::from_toml(&text).unwrap(), cfg);
        // Deserializing checks: a bad stage in JSON is refused.
        let mut bad = json;
        bad["stages"][1]["max_norm"] = serde_json::json!(-1.0);
        let err = serde_json::from_value::<PipelineConfig>(bad).unwrap_err();
        assert!(err.to_string().contains("max_norm"), "{err}");
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let err = PipelineConfig::from_toml("weighting = \"best\"").unwrap_err();
        assert!(err.contains("best"), "{err}");
        let err = PipelineConfig::from_toml("weightin = \"uniform\"").unwrap_err();
        assert!(err.contains("weightin"), "{err}");
        let err =
            PipelineConfig::from_toml("[[stages]]\nkind = \"clip\"\nmax_nrm = 1.0").unwrap_err();
        assert!(err.contains("max_nrm"), "{err}");
    }

    #[test]
    fn fedselect_is_checked_when_set_later() {
        let cfg = PipelineConfig::from_toml("[[stages]]\nkind = \"median\"").unwrap();
        let err = cfg
            .with_personalization(Personalization::Fedselect)
            .unwrap_err();
        assert!(err.contains("median"), "{err}");
    }
}
