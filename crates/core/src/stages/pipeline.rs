//! A checked pipeline: the stages of a config, built by the registry, in
//! phase order, with the cross-stage rules checked through the stages'
//! declared capabilities.

use super::mean::Mean;
use super::registry::{self, kinds_of};
use super::{Combiner, Noise, Phase, ServerStep, Stage, StageInfo, StageTable, UpdateTransform};

#[derive(Debug)]
pub struct Pipeline {
    pub transforms: Vec<Box<dyn UpdateTransform>>,
    pub combiner: Box<dyn Combiner>,
    pub noise: Option<Box<dyn Noise>>,
    pub optimizer: Option<Box<dyn ServerStep>>,
    /// Where the combiner was listed (`stages[i]`), for messages; None: the
    /// default mean.
    combiner_at: Option<usize>,
}

impl Default for Pipeline {
    /// No stages: the weighted mean.
    fn default() -> Self {
        Pipeline {
            transforms: Vec::new(),
            combiner: Box::new(Mean),
            noise: None,
            optimizer: None,
            combiner_at: None,
        }
    }
}

impl Pipeline {
    pub fn build(tables: &[StageTable]) -> Result<Pipeline, String> {
        let mut p = Pipeline::default();
        let mut phase: Option<Phase> = None;
        for (i, table) in tables.iter().enumerate() {
            let at = |msg: String| format!("stages[{i}]: {msg}");
            let kind = match table.get("kind") {
                Some(serde_json::Value::String(k)) => k.as_str(),
                Some(other) => return Err(at(format!("`kind` must be a string, got {other}"))),
                None => return Err(at("missing `kind`".into())),
            };
            let entry = registry::lookup(kind).map_err(at)?;
            if phase.is_some_and(|p| entry.phase < p) {
                return Err(at(format!(
                    "out of order: stages run as transforms ({}) → one combiner ({}) → \
                     noise ({}) → one server optimizer ({})",
                    kinds_of(Phase::Transform),
                    kinds_of(Phase::Combine),
                    kinds_of(Phase::Noise),
                    kinds_of(Phase::ServerOptimizer),
                )));
            }
            if phase == Some(entry.phase) && entry.phase != Phase::Transform {
                return Err(at("only one stage of this phase is allowed".into()));
            }
            phase = Some(entry.phase);
            match (entry.build)(table).map_err(at)? {
                Stage::Transform(t) => p.transforms.push(t),
                Stage::Combiner(c) => {
                    p.combiner = c;
                    p.combiner_at = Some(i);
                }
                Stage::Noise(n) => p.noise = Some(n),
                Stage::ServerOptimizer(o) => p.optimizer = Some(o),
            }
        }
        p.check_noise()?;
        Ok(p)
    }

    fn check_noise(&self) -> Result<(), String> {
        let Some(noise) = &self.noise else {
            return Ok(());
        };
        if noise.needs_norm_bound() && !self.transforms.iter().any(|t| t.bounds_norms()) {
            return Err(format!(
                "{} needs a clip stage before it: the noise is calibrated to the clip norm \
                 (the sensitivity of the mean)",
                noise.kind()
            ));
        }
        if noise.needs_weighted_mean() && !self.combiner.is_weighted_mean() {
            return Err(format!(
                "{} works with the mean combiner only: its calibration assumes a weighted \
                 mean of clipped updates, not `{}`",
                noise.kind(),
                self.combiner.kind()
            ));
        }
        Ok(())
    }

    /// Every stage, in the order it runs (the default mean included).
    pub fn stages(&self) -> impl Iterator<Item = &dyn StageInfo> {
        let transforms = self.transforms.iter().map(|t| t.as_info());
        let combiner = std::iter::once(self.combiner.as_info());
        let noise = self.noise.iter().map(|n| n.as_info());
        let optimizer = self.optimizer.iter().map(|o| o.as_info());
        transforms.chain(combiner).chain(noise).chain(optimizer)
    }

    /// The combiner's name, as the measurements record it.
    pub fn combiner_name(&self) -> &'static str {
        self.combiner.kind()
    }

    /// The fewest updates the pipeline can aggregate as configured, and
    /// why, naming the stage (None: one is enough).
    pub fn min_updates(&self) -> Option<(usize, String)> {
        let m = self.combiner.min_updates()?;
        let at = self
            .combiner_at
            .map_or(String::new(), |i| format!("stages[{i}] "));
        Some((m.need, format!("{at}({}): {}", m.setting, m.why)))
    }

    /// Whether some stage keeps state across rounds.
    pub fn is_stateful(&self) -> bool {
        self.stages().any(|s| s.state().is_some())
    }

    /// Whether the stages need a global model (norms of updates, server
    /// optimizers): without one there is no "update", only a model.
    pub fn needs_global(&self) -> bool {
        !self.transforms.is_empty() || self.optimizer.is_some()
    }

    /// Whether a first pass over the data (norms, Gram matrix) is needed
    /// before combining.
    pub fn needs_statistics(&self) -> bool {
        !self.transforms.is_empty() || self.combiner.needs_gram()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;

    fn build(toml_text: &str) -> Result<std::sync::Arc<Pipeline>, String> {
        PipelineConfig::from_toml(toml_text).map(|c| c.pipeline_arc())
    }

    #[test]
    fn empty_is_plain_mean() {
        let p = build("").unwrap();
        assert_eq!(p.combiner_name(), "mean");
        assert!(!p.needs_global() && !p.needs_statistics() && !p.is_stateful());
    }

    #[test]
    fn order_is_enforced() {
        let err =
            build("[[stages]]\nkind = \"median\"\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0")
                .unwrap_err();
        assert!(err.contains("stages[1]: out of order"), "{err}");
        let err = build("[[stages]]\nkind = \"median\"\n[[stages]]\nkind = \"mean\"").unwrap_err();
        assert!(err.contains("only one"), "{err}");
        let err =
            build("[[stages]]\nkind = \"fedadam\"\n[[stages]]\nkind = \"fedyogi\"").unwrap_err();
        assert!(err.contains("only one"), "{err}");
        let err = build("[[stages]]\nkind = \"averaging\"").unwrap_err();
        assert!(err.contains("unknown stage kind `averaging`"), "{err}");
    }

    #[test]
    fn dp_needs_clip_and_mean() {
        let err = build("[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0").unwrap_err();
        assert!(err.contains("needs a clip"), "{err}");
        let err = build(
            "[[stages]]\nkind = \"zeroing\"\nmax_norm = 1.0\n\
             [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0",
        )
        .unwrap_err();
        assert!(
            err.contains("needs a clip"),
            "zeroing bounds nothing: {err}"
        );
        let err = build(
            "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n[[stages]]\nkind = \"median\"\n\
             [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0",
        )
        .unwrap_err();
        assert!(err.contains("mean combiner only"), "{err}");
        build(
            "[[stages]]\nkind = \"clip\"\nmax_norm = 2.0\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n\
             [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0",
        )
        .unwrap();
    }

    #[test]
    fn bad_parameters_are_named() {
        for (text, want) in [
            ("[[stages]]\nkind = \"clip\"\nmax_norm = -1.0", "max_norm"),
            ("[[stages]]\nkind = \"trimmed_mean\"\nbeta = 0.5", "beta"),
            (
                "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 0",
                "select",
            ),
            ("[[stages]]\nkind = \"fedadam\"\nbeta2 = 1.5", "beta2"),
            (
                "[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = -1.0",
                "noise_multiplier",
            ),
            ("[[stages]]\nkind = \"median\"\nbucket = 0", "bucket"),
        ] {
            let err = build(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
