//! `client.toml`: one client's identity, where its queue/bucket/table are,
//! and how it trains. Every key is documented in `examples/client.toml`.
//! Relative paths (dataset files, the external command, workdir) are
//! relative to the directory the client is started from.

use std::path::{Path, PathBuf};

use fedstep_cloud::keys::check_id;
use fedstep_core::personalization::PersonalFractions;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub client_id: String,
    /// Take part only in these jobs; messages for others are dropped.
    /// Absent: every job announced on this client's queue.
    #[serde(default)]
    pub jobs: Option<Vec<String>>,
    pub queue_url: String,
    pub bucket: String,
    pub updates_table: String,
    /// Overrides AWS_REGION / the profile's region.
    #[serde(default)]
    pub region: Option<String>,
    /// Overrides AWS_ENDPOINT_URL (emulators).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Path-style S3 addressing (emulators need it; there is no env var).
    #[serde(default)]
    pub s3_force_path_style: bool,
    /// How long a received message stays invisible; the client extends it
    /// every third of this while it works.
    #[serde(default = "default_visibility")]
    pub visibility_timeout_seconds: u32,
    /// SQS long-poll wait (0–20).
    #[serde(default = "default_wait")]
    pub wait_seconds: u32,
    /// Exit when `training_complete` (status 0) or `job_failed` (status 3)
    /// arrives for a job of ours.
    #[serde(default)]
    pub exit_on_complete: bool,
    /// Scratch space for downloaded and trained models.
    #[serde(default = "default_workdir")]
    pub workdir: PathBuf,
    pub trainer: TrainerConfig,
    /// FedSelect personalization (issue #7). Absent: upload whole models.
    #[serde(default)]
    pub personalization: Option<PersonalizationConfig>,
}

/// `[personalization]`: keep the elements local training moved most.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PersonalizationConfig {
    pub mode: PersonalizationMode,
    /// Share of every float tensor kept personal once the ramp is done, in [0, 1).
    pub personal_fraction: f64,
    /// Per-tensor overrides of `personal_fraction`, by tensor name, each in
    /// [0, 1). A name that is not a float tensor of the job's model fails
    /// the round's split with an error naming it.
    #[serde(default)]
    pub tensor_fractions: std::collections::BTreeMap<String, f64>,
    /// Rounds over which the share grows linearly from 0 (0: from round 1).
    #[serde(default = "default_ramp")]
    pub ramp_rounds: u32,
}

impl PersonalizationConfig {
    /// The checked fractions; errors name the key.
    pub fn fractions(&self) -> Result<PersonalFractions, String> {
        fedstep_core::personalization::schedule::check_fraction(self.personal_fraction)
            .map_err(|e| format!("personalization.personal_fraction: {e}"))?;
        PersonalFractions::new(self.personal_fraction, self.tensor_fractions.clone())
            .map_err(|e| format!("personalization.tensor_fractions: {e}"))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PersonalizationMode {
    /// FedSelect (Tamirisa et al., 2024); the job's pipeline must say
    /// `personalization = "fedselect"`, or the aggregator rejects the masks.
    Fedselect,
}

fn default_ramp() -> u32 {
    3
}

fn default_visibility() -> u32 {
    300
}
fn default_wait() -> u32 {
    20
}
fn default_workdir() -> PathBuf {
    std::env::temp_dir().join("fedstep-client")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TrainerConfig {
    /// fedstep-trainer's candle MLP on a local dataset.
    Builtin(BuiltinConfig),
    /// Any program honouring the file contract (docs/design.md §5).
    External(ExternalConfig),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// UCI 8×8 digits: the bundled copy, or `digits_csv`.
    Digits,
    /// MNIST IDX files `mnist_images` + `mnist_labels`.
    Mnist,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuiltinConfig {
    pub dataset: DatasetKind,
    #[serde(default)]
    pub digits_csv: Option<PathBuf>,
    #[serde(default)]
    pub mnist_images: Option<PathBuf>,
    #[serde(default)]
    pub mnist_labels: Option<PathBuf>,
    /// The classes this client mostly holds (non-IID share, as in
    /// `fedstep simulate`). Absent: the whole dataset.
    #[serde(default)]
    pub classes: Option<Vec<u8>>,
    #[serde(default = "one")]
    pub sel_prob: f64,
    #[serde(default = "five_percent")]
    pub def_prob: f64,
    /// Seeds the share drawn from the dataset and the minibatch order; give
    /// each client its own.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "two")]
    pub local_epochs: usize,
    #[serde(default = "batch")]
    pub batch_size: usize,
    #[serde(default = "lr")]
    pub learning_rate: f64,
}

fn one() -> f64 {
    1.0
}
fn five_percent() -> f64 {
    0.05
}
fn two() -> usize {
    2
}
fn batch() -> usize {
    32
}
fn lr() -> f64 {
    0.1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// Program and arguments; run without a shell.
    pub command: Vec<String>,
    /// Kill the command after this long (the attempt fails; the message is
    /// redelivered later). Absent: no limit.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<ClientConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ClientConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks; errors name the key.
    pub fn from_toml(text: &str) -> Result<ClientConfig, String> {
        let cfg: ClientConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn check(&self) -> Result<(), String> {
        check_id("client_id", &self.client_id)?;
        if let Some(p) = &self.personalization {
            p.fractions()?;
        }
        for j in self.jobs.iter().flatten() {
            check_id("jobs entry", j)?;
        }
        for (key, v) in [
            ("queue_url", &self.queue_url),
            ("bucket", &self.bucket),
            ("updates_table", &self.updates_table),
        ] {
            if v.trim().is_empty() {
                return Err(format!("{key} is empty"));
            }
        }
        // SQS allows 0 s – 12 h; below 3 s the heartbeat (every third)
        // could not keep up with a slow API call.
        if !(3..=43_200).contains(&self.visibility_timeout_seconds) {
            return Err("visibility_timeout_seconds must be between 3 and 43200".into());
        }
        if self.wait_seconds > 20 {
            return Err("wait_seconds must be between 0 and 20 (SQS long-poll limit)".into());
        }
        match &self.trainer {
            TrainerConfig::Builtin(b) => b.check(),
            TrainerConfig::External(e) => e.check(),
        }
    }
}

impl BuiltinConfig {
    fn check(&self) -> Result<(), String> {
        match self.dataset {
            DatasetKind::Digits => {
                if self.mnist_images.is_some() || self.mnist_labels.is_some() {
                    return Err("trainer.mnist_images/mnist_labels need dataset = \"mnist\"".into());
                }
            }
            DatasetKind::Mnist => {
                if self.mnist_images.is_none() || self.mnist_labels.is_none() {
                    return Err(
                        "dataset = \"mnist\" needs trainer.mnist_images and trainer.mnist_labels"
                            .into(),
                    );
                }
                if self.digits_csv.is_some() {
                    return Err("trainer.digits_csv needs dataset = \"digits\"".into());
                }
            }
        }
        for (key, p) in [("sel_prob", self.sel_prob), ("def_prob", self.def_prob)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("trainer.{key} must be in [0, 1], got {p}"));
            }
        }
        if self.classes.as_ref().is_some_and(|c| c.is_empty()) {
            return Err("trainer.classes is empty (leave it out to use every class)".into());
        }
        if self.local_epochs == 0 || self.batch_size == 0 {
            return Err("trainer.local_epochs and trainer.batch_size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err("trainer.learning_rate must be a positive number".into());
        }
        Ok(())
    }
}

impl ExternalConfig {
    fn check(&self) -> Result<(), String> {
        if self.command.first().is_none_or(|p| p.is_empty()) {
            return Err("trainer.command must name a program".into());
        }
        if self.timeout_seconds == Some(0) {
            return Err("trainer.timeout_seconds must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
client_id = "site-a"
queue_url = "http://localhost:4566/000000000000/fedstep-client-site-a"
bucket = "fedstep-models"
updates_table = "fedstep-updates"
"#;

    fn parse(trainer: &str) -> Result<ClientConfig, String> {
        ClientConfig::from_toml(&format!("{BASE}{trainer}"))
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../../examples/client.toml");
        let cfg = ClientConfig::from_toml(text).unwrap();
        assert!(matches!(cfg.trainer, TrainerConfig::Builtin(_)));
    }

    #[test]
    fn personalization_fractions_are_checked_by_key() {
        let t = "[trainer]\nkind = \"builtin\"\ndataset = \"digits\"\n[personalization]\nmode = \"fedselect\"\n";
        let c = parse(&format!(
            "{t}personal_fraction = 0.0\n[personalization.tensor_fractions]\n\"fc2.bias\" = 0.5\n"
        ))
        .unwrap();
        let f = c.personalization.unwrap().fractions().unwrap();
        assert_eq!((f.of("fc2.bias"), f.of("fc1.weight")), (0.5, 0.0));
        let err = parse(&format!("{t}personal_fraction = 1.0\n")).unwrap_err();
        assert!(
            err.starts_with("personalization.personal_fraction: "),
            "{err}"
        );
        let err = parse(&format!(
            "{t}personal_fraction = 0.1\n[personalization.tensor_fractions]\n\"fc2.bias\" = -1\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with("personalization.tensor_fractions: tensor `fc2.bias`: "),
            "{err}"
        );
    }

    #[test]
    fn builtin_and_external() {
        let c = parse("[trainer]\nkind = \"builtin\"\ndataset = \"digits\"\nclasses = [1, 2]\n")
            .unwrap();
        let TrainerConfig::Builtin(b) = &c.trainer else {
            panic!()
        };
        assert_eq!(b.classes.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!((b.sel_prob, b.def_prob, b.local_epochs), (1.0, 0.05, 2));
        assert_eq!(c.visibility_timeout_seconds, 300);
        assert_eq!(c.jobs, None);
        let c = parse(
            "jobs = [\"j1\"]\n[trainer]\nkind = \"external\"\ncommand = [\"python3\", \"t.py\"]\n",
        )
        .unwrap();
        assert!(matches!(c.trainer, TrainerConfig::External(_)));
        assert_eq!(c.jobs, Some(vec!["j1".to_string()]));
    }

    #[test]
    fn errors_name_the_key() {
        for (text, want) in [
            ("[trainer]\nkind = \"builtin\"\ndataset = \"digits\"\nsel_prob = 2.0\n", "sel_prob"),
            ("[trainer]\nkind = \"builtin\"\ndataset = \"mnist\"\n", "mnist_images"),
            ("[trainer]\nkind = \"builtin\"\ndataset = \"digits\"\nepochs = 3\n", "epochs"),
            ("[trainer]\nkind = \"external\"\ncommand = []\n", "trainer.command"),
            ("[trainer]\nkind = \"gpu\"\n", "gpu"),
            ("visibility_timeout_seconds = 1\n[trainer]\nkind = \"external\"\ncommand = [\"x\"]\n", "visibility_timeout_seconds"),
            ("colour = 1\n[trainer]\nkind = \"external\"\ncommand = [\"x\"]\n", "colour"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let text = format!("{BASE}[trainer]\nkind = \"external\"\ncommand = [\"x\"]\n");
        let err = ClientConfig::from_toml(&text.replace("site-a\"", "../a\"")).unwrap_err();
        assert!(err.contains("client_id"), "{err}");
    }
}
