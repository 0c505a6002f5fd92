//! `fedstep simulate`'s flags, and their checks: every bad combination is
//! refused before any data is loaded, with a message naming the flag.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fedstep_core::personalization::schedule::check_fraction;
use fedstep_core::personalization::{PersonalFractions, Personalization, Ramp};
use fedstep_core::PipelineConfig;
use fedstep_trainer::{TrainConfig, TENSOR_NAMES};
use serde::Serialize;

use super::classes::{default_groups, parse_groups};
use super::secure::SecureSim;
use super::timestamp;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Number of simulated clients [default: 3, or the number of --classes groups].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Preferred classes per client: groups separated by `;`, classes by `,`
    /// [default: "1,2,3;4,5,6;7,8,9,0" (STADLE's demo); more clients repeat
    /// these three profiles in turn; one or two split the digits].
    #[arg(long)]
    pub classes: Option<String>,
    /// Probability that a client takes a sample of one of its classes.
    #[arg(long, default_value_t = 1.0)]
    pub sel_prob: f64,
    /// Probability that a client takes a sample of any other class.
    #[arg(long, default_value_t = 0.05)]
    pub def_prob: f64,
    /// Rounds of federated training.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Local epochs per round (the baselines get rounds × local epochs).
    #[arg(long, default_value_t = TrainConfig::default().local_epochs)]
    pub local_epochs: usize,
    /// Local minibatch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Local SGD learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Hidden width of the MLP.
    #[arg(long, default_value_t = TrainConfig::default().hidden)]
    pub hidden: usize,
    /// Seed for the split, the initial model and every minibatch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Aggregation pipeline (fedstep-core PipelineConfig TOML, e.g.
    /// examples/aggregation/median.toml) [default: FedAvg].
    #[arg(long, value_name = "CONFIG.toml")]
    pub aggregation: Option<PathBuf>,
    /// Run directory (model store, report.json, accuracy.svg)
    /// [default: runs/simulate-YYYYMMDD-HHMMSS, in UTC].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The last K clients train on shuffled labels.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub noisy_clients: usize,
    /// The last K clients send sign-flipped, scaled updates
    /// (global − s·(local − global)) and claim their usual example count.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub byzantine_clients: usize,
    /// The scale s of a byzantine update.
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    pub byzantine_scale: f64,
    /// Share of the data held out for the global test set.
    #[arg(long, default_value_t = 0.25)]
    pub test_fraction: f64,
    /// Share of each client's data held out to measure the metrics it
    /// reports (what `quality` weighting reads).
    #[arg(long, default_value_t = 0.2)]
    pub validation_fraction: f64,
    /// Personalized FL: `fedselect` (Tamirisa et al., 2024) — each client
    /// keeps the elements its training moved most local, uploads the rest
    /// with masks, and the server averages each element over the clients
    /// that shared it (adds `personalization = "fedselect"` to the
    /// pipeline). Reports global / personalized / local-only accuracy per
    /// client on its own test distribution.
    #[arg(long, value_enum, default_value = "none")]
    pub personalization: PersonalizationFlag,
    /// With --personalization fedselect: the share of every float tensor
    /// each client keeps personal once the ramp is done, in [0, 1).
    #[arg(long, default_value_t = 0.2, value_name = "F")]
    pub personal_fraction: f64,
    /// With --personalization fedselect: the share of one tensor, by name
    /// (`fc2.bias=0.5`), overriding --personal-fraction; repeatable.
    /// `--personal-fraction 0 --personal-tensor fc2.bias=0.5` keeps only
    /// each client's label prior personal.
    #[arg(long = "personal-tensor", value_name = "NAME=F", value_parser = parse_tensor_fraction)]
    pub personal_tensors: Vec<(String, f64)>,
    /// With --personalization fedselect: rounds over which the personal
    /// share grows linearly from 0 to --personal-fraction (0: at once).
    #[arg(long, default_value_t = 3, value_name = "R")]
    pub personal_ramp: u32,
    /// The local-training algorithm against client drift (issue #19):
    /// `fedavg` (plain local SGD), `fedprox` (adds μ/2·‖w − w_global‖² to
    /// the local loss; --mu) or `scaffold` (control variates: the server's
    /// c travels with each round's model, each client keeps its own c_i and
    /// sends Δc_i).
    #[arg(long, value_enum, default_value = "fedavg")]
    pub algorithm: Algorithm,
    /// FedProx's μ (with --algorithm fedprox).
    #[arg(long, value_name = "M")]
    pub mu: Option<f64>,
    /// `sync` (each round waits for every client) or `async` (FedBuff,
    /// issue #17: a new version from every --buffer-size updates, stale
    /// ones discounted). Async runs on a simulated clock (--client-speeds)
    /// beside the sync federation at the same speeds, and reports the
    /// simulated time each needs to reach --target-accuracy.
    #[arg(long, value_enum, default_value = "sync")]
    pub mode: ModeFlag,
    /// With --mode async: K, the updates a version is made from [default:
    /// a tenth of the clients, rounded up].
    #[arg(long, value_name = "K")]
    pub buffer_size: Option<u32>,
    /// With --mode async: the simulated seconds one local training takes on
    /// each client, one per client (`1,1,4`: the third is four times
    /// slower) [default: 1 for every client].
    #[arg(long, value_name = "S,S,..", value_delimiter = ',')]
    pub client_speeds: Vec<f64>,
    /// With --mode async: the accuracy whose simulated time to reach is
    /// compared [default: 0.95 × the sync run's final accuracy].
    #[arg(long, value_name = "A")]
    pub target_accuracy: Option<f64>,
    /// With --mode async: a in the staleness discount s(τ) = 1/(1+τ)^a.
    #[arg(long, value_name = "A")]
    pub staleness_exponent: Option<f64>,
    /// With --mode async: updates more than this many versions old are
    /// rejected [default: 20].
    #[arg(long, value_name = "V")]
    pub max_staleness: Option<u32>,
    /// With --mode async: η, how far each version moves the global model
    /// towards the buffer's discounted mean [default: 1, the mean itself].
    #[arg(long, value_name = "ETA")]
    pub server_learning_rate: Option<f64>,
    /// Also run the federation with every round's mean computed by SecAgg+
    /// (all four phases in process: the aggregator sees only masked
    /// vectors), and report its accuracy beside the plain run's.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// With --secure-aggregation: each coordinate of an update delta is
    /// clipped to [−C, C] before quantization [default: 1].
    #[arg(long, value_name = "C", requires = "secure_aggregation")]
    pub secagg_clip: Option<f32>,
    /// With --secure-aggregation: neighbours per client, k [default: every
    /// other client].
    #[arg(long, value_name = "K", requires = "secure_aggregation")]
    pub secagg_neighbours: Option<usize>,
    /// MNIST images (IDX, e.g. train-images-idx3-ubyte) instead of the
    /// bundled digits.
    #[arg(long, requires = "mnist_labels", value_name = "FILE")]
    pub mnist_images: Option<PathBuf>,
    /// MNIST labels (IDX, e.g. train-labels-idx1-ubyte).
    #[arg(long, requires = "mnist_images", value_name = "FILE")]
    pub mnist_labels: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Fedavg,
    Fedprox,
    Scaffold,
}

impl Algorithm {
    /// Its name in reports and the round config.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Fedavg => "fedavg",
            Algorithm::Fedprox => "fedprox",
            Algorithm::Scaffold => "scaffold",
        }
    }
}

/// FedProx's μ when --mu is not given. On simulate's defaults no μ of the
/// sweep in `scripts/drift-table.sh` beats FedAvg (README, "Client
/// drift"): 0.01 ties it, 0.1 costs a little, 1 costs 5-10 points.
pub const DEFAULT_MU: f64 = 0.01;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeFlag {
    Sync,
    Async,
}

/// --mode async's settings, checked.
#[derive(Debug, Clone, Serialize)]
pub struct AsyncSim {
    pub buffer_size: u32,
    /// Simulated seconds of one local training, per client.
    pub client_speeds: Vec<f64>,
    /// None: 0.95 × the sync run's final accuracy.
    pub target_accuracy: Option<f64>,
    pub staleness_exponent: f64,
    pub max_staleness: u32,
    /// η; None: the job's default.
    pub server_learning_rate: Option<f64>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonalizationFlag {
    None,
    Fedselect,
}

/// FedSelect's client-side settings.
#[derive(Debug, Clone, Serialize)]
pub struct PersonalSettings {
    pub method: &'static str,
    pub personal_fraction: f64,
    /// --personal-tensor overrides.
    pub tensor_fractions: BTreeMap<String, f64>,
    pub ramp_rounds: u32,
    #[serde(skip)]
    pub ramp: Ramp,
}

/// Where the data comes from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// The UCI digits shipped in fedstep-trainer.
    Digits,
    Mnist {
        images: PathBuf,
        labels: PathBuf,
    },
}

/// The checked, resolved settings of one simulation (also written to
/// report.json as `config`).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub data: DataSource,
    /// One preferred-class group per client; checked against the dataset
    /// once it is loaded.
    pub groups: Vec<Vec<u8>>,
    /// True when the groups came from the default rule (so they are
    /// recomputed for the dataset's class count).
    #[serde(skip)]
    pub default_groups: bool,
    pub sel_prob: f64,
    pub def_prob: f64,
    pub rounds: u32,
    pub local_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub hidden: usize,
    pub seed: u64,
    pub noisy_clients: usize,
    pub byzantine_clients: usize,
    pub byzantine_scale: f64,
    pub test_fraction: f64,
    pub validation_fraction: f64,
    /// The aggregation file, if any, and its parsed pipeline.
    pub aggregation_file: Option<PathBuf>,
    #[serde(skip)]
    pub aggregation: toml::Table,
    #[serde(skip)]
    pub pipeline: PipelineConfig,
    /// --personalization fedselect.
    pub personalization: Option<PersonalSettings>,
    /// --algorithm.
    pub algorithm: Algorithm,
    /// FedProx's μ (0 unless --algorithm fedprox).
    pub mu: f64,
    /// --mode async.
    #[serde(rename = "async")]
    pub asynchronous: Option<AsyncSim>,
    /// --secure-aggregation.
    pub secure_aggregation: Option<SecureSim>,
    pub out: PathBuf,
}

impl Settings {
    pub fn clients(&self) -> usize {
        self.groups.len()
    }

    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            local_epochs: self.local_epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            seed: self.seed,
            hidden: self.hidden,
            proximal_mu: self.mu,
        }
    }

    /// The job's `[round_config]`: what real clients read the algorithm
    /// and μ from (README, the external-trainer contract).
    pub fn round_config(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut rc = serde_json::Map::new();
        if self.algorithm != Algorithm::Fedavg {
            rc.insert("algorithm".into(), self.algorithm.name().into());
        }
        if self.algorithm == Algorithm::Fedprox {
            rc.insert("mu".into(), self.mu.into());
        }
        rc
    }

    /// Client k (0-based) trains on shuffled labels.
    pub fn is_noisy(&self, k: usize) -> bool {
        k >= self.clients() - self.noisy_clients
    }

    /// Client k (0-based) sends a sign-flipped, scaled update.
    pub fn is_byzantine(&self, k: usize) -> bool {
        k >= self.clients() - self.byzantine_clients
    }
}

/// How many clients the defaults use: STADLE's three agents.
const DEFAULT_CLIENTS: usize = 3;
/// Digits and MNIST both have ten classes; used for the default groups
/// before the dataset is loaded (recomputed afterwards).
const DIGIT_CLASSES: usize = 10;

impl Args {
    /// --mode async and its flags, for `n` clients; the flags without it
    /// are refused, naming it.
    fn async_settings(&self, n: usize) -> Result<Option<AsyncSim>> {
        if self.mode == ModeFlag::Sync {
            for (flag, given) in [
                ("--buffer-size", self.buffer_size.is_some()),
                ("--client-speeds", !self.client_speeds.is_empty()),
                ("--target-accuracy", self.target_accuracy.is_some()),
                ("--staleness-exponent", self.staleness_exponent.is_some()),
                ("--max-staleness", self.max_staleness.is_some()),
                (
                    "--server-learning-rate",
                    self.server_learning_rate.is_some(),
                ),
            ] {
                if given {
                    bail!("{flag} applies to --mode async only");
                }
            }
            return Ok(None);
        }
        if self.personalization != PersonalizationFlag::None
            || self.algorithm == Algorithm::Scaffold
        {
            bail!(
                "--mode async with --personalization fedselect or --algorithm scaffold: both \
                 keep per-client state against one global model, which a stale update was not \
                 trained from (ARCHITECTURE.md, \"Asynchronous jobs\")"
            );
        }
        let buffer_size = self.buffer_size.unwrap_or_else(|| {
            fedstep_cloud::asynchronous::AsyncSettings::default_buffer_size(n, 1)
        });
        if buffer_size == 0 || buffer_size as usize > n {
            bail!("--buffer-size {buffer_size} must be between 1 and the {n} clients");
        }
        let client_speeds = if self.client_speeds.is_empty() {
            vec![1.0; n]
        } else {
            self.client_speeds.clone()
        };
        if client_speeds.len() != n {
            bail!(
                "--client-speeds gives {} values for {n} clients: one per client",
                client_speeds.len()
            );
        }
        if let Some(s) = client_speeds.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("--client-speeds: {s} is not a positive number of simulated seconds");
        }
        if let Some(a) = self.target_accuracy.filter(|a| !(*a > 0.0 && *a <= 1.0)) {
            bail!("--target-accuracy must be in (0, 1], got {a}");
        }
        let staleness_exponent = self
            .staleness_exponent
            .unwrap_or(fedstep_core::staleness::Staleness::DEFAULT_EXPONENT);
        fedstep_core::staleness::Staleness::Polynomial {
            exponent: staleness_exponent,
        }
        .check()
        .map_err(|e| anyhow::anyhow!("--staleness-exponent: {e}"))?;
        if let Some(eta) = self
            .server_learning_rate
            .filter(|eta| !(eta.is_finite() && *eta > 0.0))
        {
            bail!("--server-learning-rate must be positive, got {eta}");
        }
        let cap = fedstep_cloud::asynchronous::AsyncSettings::STALENESS_CAP;
        if let Some(v) = self.max_staleness.filter(|&v| v > cap) {
            bail!("--max-staleness {v} is more than {cap}: a version carries late updates from at most {} versions back", cap + 1);
        }
        Ok(Some(AsyncSim {
            buffer_size,
            client_speeds,
            target_accuracy: self.target_accuracy,
            staleness_exponent,
            max_staleness: self
                .max_staleness
                .unwrap_or(fedstep_cloud::asynchronous::AsyncSettings::DEFAULT_MAX_STALENESS),
            server_learning_rate: self.server_learning_rate,
        }))
    }

    /// --secure-aggregation and its flags. SecAgg+ sums examples-weighted
    /// deltas; what needs one client's update on its own is refused.
    fn secure_settings(&self, n: usize) -> Result<Option<SecureSim>> {
        if !self.secure_aggregation {
            return Ok(None);
        }
        for (given, what) in [
            (
                self.aggregation.is_some(),
                "--aggregation (robust combiners, server-side clipping and type-aware \
                 weights need individual updates or metrics)",
            ),
            (
                self.personalization != PersonalizationFlag::None,
                "--personalization fedselect (masked updates of different supports)",
            ),
            (
                self.algorithm == Algorithm::Scaffold,
                "--algorithm scaffold (its control variates travel beside the update)",
            ),
            (
                self.mode == ModeFlag::Async,
                "--mode async (a version is made from one buffer, not one round of \
                 all clients)",
            ),
            (
                self.byzantine_clients > 0,
                "--byzantine-clients (nothing could tell the attack apart)",
            ),
        ] {
            if given {
                bail!("--secure-aggregation with {what}");
            }
        }
        if n < 3 {
            bail!("--secure-aggregation needs at least 3 clients (a sum of fewer reveals one)");
        }
        let clip = self.secagg_clip.unwrap_or(SecureSim::DEFAULT_CLIP);
        if !(clip.is_finite() && clip > 0.0) {
            bail!("--secagg-clip must be positive, got {clip}");
        }
        if let Some(k) = self.secagg_neighbours.filter(|&k| k < 2 || k >= n) {
            bail!(
                "--secagg-neighbours {k}: between 2 and the {} other clients",
                n - 1
            );
        }
        Ok(Some(SecureSim {
            clip,
            quant_bits: SecureSim::DEFAULT_QUANT_BITS,
            neighbours: self.secagg_neighbours,
        }))
    }

    pub fn resolve(self) -> Result<Settings> {
        let (groups, default) = match (&self.classes, self.clients) {
            (Some(text), n) => {
                let groups = parse_groups(text)?;
                if let Some(n) = n {
                    if n != groups.len() {
                        bail!(
                            "--clients {n} but --classes gives {} groups ({text:?}): \
                             give one `;`-separated group per client",
                            groups.len()
                        );
                    }
                }
                (groups, false)
            }
            (None, Some(0)) => bail!("--clients must be at least 1"),
            (None, n) => (
                default_groups(n.unwrap_or(DEFAULT_CLIENTS), DIGIT_CLASSES),
                true,
            ),
        };
        let n = groups.len();
        if n > 1000 {
            bail!("--clients {n}: at most 1000 simulated clients");
        }
        for (flag, p) in [("--sel-prob", self.sel_prob), ("--def-prob", self.def_prob)] {
            if !(0.0..=1.0).contains(&p) {
                bail!("{flag} must be a probability in [0, 1], got {p}");
            }
        }
        if self.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        if self.noisy_clients + self.byzantine_clients > n {
            bail!(
                "--noisy-clients {} + --byzantine-clients {} exceeds the {n} clients \
                 (each takes the last K clients; they may not overlap)",
                self.noisy_clients,
                self.byzantine_clients
            );
        }
        if !(self.byzantine_scale.is_finite() && self.byzantine_scale > 0.0) {
            bail!(
                "--byzantine-scale must be a positive number, got {}",
                self.byzantine_scale
            );
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            bail!(
                "--test-fraction must be in (0, 1), got {}",
                self.test_fraction
            );
        }
        if !(self.validation_fraction > 0.0 && self.validation_fraction <= 0.5) {
            bail!(
                "--validation-fraction must be in (0, 0.5], got {}",
                self.validation_fraction
            );
        }
        let (mut aggregation, mut pipeline) = match &self.aggregation {
            None => (toml::Table::new(), PipelineConfig::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--aggregation {}", path.display()))?;
                let pipeline = PipelineConfig::from_toml(&text)
                    .map_err(|e| anyhow::anyhow!("--aggregation {}: {e}", path.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("--aggregation {}", path.display()))?;
                (table, pipeline)
            }
        };
        let personalization = match self.personalization {
            PersonalizationFlag::None => {
                if pipeline.personalization() == Personalization::Fedselect {
                    bail!(
                        "the --aggregation pipeline says personalization = \"fedselect\": \
                         pass --personalization fedselect so the clients send masked updates"
                    );
                }
                None
            }
            PersonalizationFlag::Fedselect => {
                check_fraction(self.personal_fraction)
                    .map_err(|e| anyhow::anyhow!("--personal-fraction: {e}"))?;
                let tensor_fractions: BTreeMap<String, f64> =
                    self.personal_tensors.iter().cloned().collect();
                let fractions =
                    PersonalFractions::new(self.personal_fraction, tensor_fractions.clone())
                        .and_then(|f| f.check_names(TENSOR_NAMES).map(|()| f))
                        .map_err(|e| anyhow::anyhow!("--personal-tensor: {e}"))?;
                let ramp = Ramp::new(fractions, self.personal_ramp);
                // The job's pipeline must average masked updates; the
                // stages it refuses are refused here, naming the flag.
                aggregation.insert("personalization".into(), "fedselect".into());
                pipeline = pipeline
                    .with_personalization(Personalization::Fedselect)
                    .map_err(|e| {
                        anyhow::anyhow!("--personalization fedselect with this --aggregation: {e}")
                    })?;
                Some(PersonalSettings {
                    method: "fedselect",
                    personal_fraction: self.personal_fraction,
                    tensor_fractions,
                    ramp_rounds: self.personal_ramp,
                    ramp,
                })
            }
        };
        let mu = match (self.algorithm, self.mu) {
            (Algorithm::Fedprox, mu) => {
                let mu = mu.unwrap_or(DEFAULT_MU);
                if !(mu.is_finite() && mu >= 0.0) {
                    bail!("--mu must be a number >= 0, got {mu}");
                }
                mu
            }
            (_, Some(_)) => bail!("--mu is FedProx's μ: pass it with --algorithm fedprox"),
            (_, None) => 0.0,
        };
        if self.algorithm == Algorithm::Scaffold {
            fedstep_core::scaffold::check_pipeline(&pipeline)
                .map_err(|e| anyhow::anyhow!("--algorithm scaffold with this pipeline: {e}"))?;
            if self.byzantine_clients > 0 {
                bail!(
                    "--algorithm scaffold with --byzantine-clients: the simulated attack \
                     rewrites the model update only"
                );
            }
        }
        let asynchronous = self.async_settings(n)?;
        let secure_aggregation = self.secure_settings(n)?;
        let data = match (self.mnist_images, self.mnist_labels) {
            (Some(images), Some(labels)) => DataSource::Mnist { images, labels },
            _ => DataSource::Digits,
        };
        let settings = Settings {
            data,
            groups,
            default_groups: default,
            sel_prob: self.sel_prob,
            def_prob: self.def_prob,
            rounds: self.rounds,
            local_epochs: self.local_epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            hidden: self.hidden,
            seed: self.seed,
            noisy_clients: self.noisy_clients,
            byzantine_clients: self.byzantine_clients,
            byzantine_scale: self.byzantine_scale,
            test_fraction: self.test_fraction,
            validation_fraction: self.validation_fraction,
            aggregation_file: self.aggregation,
            aggregation,
            pipeline,
            personalization,
            algorithm: self.algorithm,
            mu,
            asynchronous,
            secure_aggregation,
            out: self
                .out
                .unwrap_or_else(|| PathBuf::from("runs").join(timestamp::run_dir_name())),
        };
        settings.train_config().validate().map_err(|e| {
            anyhow::anyhow!("{e} (check --local-epochs, --batch-size, --learning-rate, --hidden)")
        })?;
        Ok(settings)
    }
}

/// `NAME=F` of --personal-tensor (the range is checked with the rest).
fn parse_tensor_fraction(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=FRACTION (e.g. fc2.bias=0.5), got `{text}`"))?;
    let fraction = value
        .trim()
        .parse::<f64>()
        .map_err(|e| format!("`{value}` in `{text}` is not a number: {e}"))?;
    Ok((name.trim().to_string(), fraction))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn resolve(flags: &[&str]) -> Result<Settings> {
        let argv = std::iter::once("simulate").chain(flags.iter().copied());
        Cli::try_parse_from(argv)?.args.resolve()
    }

    #[test]
    fn algorithm_and_mu() {
        let s = resolve(&[]).unwrap();
        assert_eq!((s.algorithm, s.mu), (Algorithm::Fedavg, 0.0));
        assert!(s.round_config().is_empty());
        let s = resolve(&["--algorithm", "fedprox"]).unwrap();
        assert_eq!(
            (s.mu, s.train_config().proximal_mu),
            (DEFAULT_MU, DEFAULT_MU)
        );
        let s = resolve(&["--algorithm", "fedprox", "--mu", "0.5"]).unwrap();
        assert_eq!(s.round_config()["mu"], 0.5);
        assert_eq!(s.round_config()["algorithm"], "fedprox");
        let s = resolve(&["--algorithm", "scaffold"]).unwrap();
        assert_eq!(s.train_config().proximal_mu, 0.0);
        assert_eq!(s.round_config()["algorithm"], "scaffold");
        let err = |flags: &[&str]| format!("{:#}", resolve(flags).unwrap_err());
        assert!(err(&["--mu", "0.1"]).contains("--algorithm fedprox"));
        assert!(err(&["--algorithm", "fedprox", "--mu=-1"]).contains("--mu"));
        let dir = tempfile::tempdir().unwrap();
        let median = dir.path().join("median.toml");
        std::fs::write(&median, "[[stages]]\nkind = \"median\"\n").unwrap();
        let e = err(&[
            "--algorithm",
            "scaffold",
            "--aggregation",
            median.to_str().unwrap(),
        ]);
        assert!(e.contains("median"), "{e}");
        let e = err(&["--algorithm", "scaffold", "--personalization", "fedselect"]);
        assert!(e.contains("fedselect"), "{e}");
    }

    #[test]
    fn async_flags() {
        assert!(resolve(&[]).unwrap().asynchronous.is_none());
        let a = resolve(&["--mode", "async"]).unwrap().asynchronous.unwrap();
        assert_eq!((a.buffer_size, a.max_staleness), (1, 20));
        assert_eq!(a.client_speeds, [1.0, 1.0, 1.0]);
        let a = resolve(&[
            "--mode",
            "async",
            "--client-speeds",
            "1,1,4",
            "--buffer-size",
            "1",
        ])
        .unwrap()
        .asynchronous
        .unwrap();
        assert_eq!((a.buffer_size, a.client_speeds[2]), (1, 4.0));
        assert_eq!(a.server_learning_rate, None, "the job's default");
        let a = resolve(&["--mode", "async", "--server-learning-rate", "1.5"]).unwrap();
        assert_eq!(a.asynchronous.unwrap().server_learning_rate, Some(1.5));
        let err = |flags: &[&str]| format!("{:#}", resolve(flags).unwrap_err());
        for (flags, want) in [
            (
                &["--buffer-size", "2"][..],
                "--buffer-size applies to --mode async",
            ),
            (
                &["--mode", "async", "--buffer-size", "4"][..],
                "between 1 and the 3",
            ),
            (
                &["--mode", "async", "--max-staleness", "32"][..],
                "--max-staleness 32 is more than 31",
            ),
            (
                &["--mode", "async", "--client-speeds", "1,2"][..],
                "2 values for 3 clients",
            ),
            (
                &["--mode", "async", "--client-speeds", "1,0,2"][..],
                "not a positive number",
            ),
            (
                &["--mode", "async", "--target-accuracy", "2"][..],
                "--target-accuracy",
            ),
            (
                &["--mode", "async", "--staleness-exponent=-1"][..],
                "--staleness-exponent",
            ),
            (
                &["--mode", "async", "--algorithm", "scaffold"][..],
                "--mode async with",
            ),
            (
                &["--server-learning-rate", "0.5"][..],
                "--server-learning-rate applies to --mode async",
            ),
            (
                &["--mode", "async", "--server-learning-rate", "0"][..],
                "must be positive",
            ),
        ] {
            let e = err(flags);
            assert!(e.contains(want), "{flags:?}: {e}");
        }
    }

    #[test]
    fn secure_aggregation_flags() {
        assert!(resolve(&[]).unwrap().secure_aggregation.is_none());
        let s = resolve(&["--secure-aggregation"]).unwrap();
        let sim = s.secure_aggregation.unwrap();
        assert_eq!((sim.clip, sim.neighbours), (SecureSim::DEFAULT_CLIP, None));
        let err = |flags: &[&str]| format!("{:#}", resolve(flags).unwrap_err());
        for (flags, want) in [
            (&["--secagg-clip", "0.5"][..], "--secure-aggregation"),
            (
                &["--secure-aggregation", "--secagg-clip", "0"][..],
                "must be positive",
            ),
            (
                &["--secure-aggregation", "--secagg-neighbours", "3"][..],
                "between 2 and the 2 other clients",
            ),
            (
                &["--secure-aggregation", "--algorithm", "scaffold"][..],
                "--secure-aggregation with --algorithm scaffold",
            ),
            (
                &["--secure-aggregation", "--mode", "async"][..],
                "--secure-aggregation with --mode async",
            ),
            (
                &["--secure-aggregation", "--clients", "2"][..],
                "at least 3 clients",
            ),
        ] {
            let e = err(flags);
            assert!(e.contains(want), "{flags:?}: {e}");
        }
    }

    #[test]
    fn defaults_are_stadles_demo() {
        let s = resolve(&[]).unwrap();
        assert_eq!(
            s.groups,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9, 0]]
        );
        assert_eq!((s.sel_prob, s.def_prob, s.rounds), (1.0, 0.05, 10));
        assert!(s.out.starts_with("runs"));
        assert!(!s.is_noisy(2) && !s.is_byzantine(2));
        let s = resolve(&["--clients", "4", "--noisy-clients", "1"]).unwrap();
        assert_eq!(s.clients(), 4);
        assert!(s.is_noisy(3) && !s.is_noisy(2));
        assert!(s.personalization.is_none());
        let s = resolve(&["--personalization", "fedselect"]).unwrap();
        let p = s.personalization.unwrap();
        assert_eq!((p.personal_fraction, p.ramp_rounds), (0.2, 3));
        let s = resolve(&[
            "--personalization",
            "fedselect",
            "--personal-fraction",
            "0",
            "--personal-tensor",
            "fc2.bias=0.5",
        ])
        .unwrap();
        let f = s.personalization.unwrap().ramp.targets().clone();
        assert_eq!((f.of("fc2.bias"), f.of("fc2.weight")), (0.5, 0.0));
        assert_eq!(s.pipeline.personalization(), Personalization::Fedselect);
        assert_eq!(s.aggregation["personalization"].as_str(), Some("fedselect"));
    }

    #[test]
    fn bad_flags_are_named() {
        for (flags, want) in [
            (&["--classes", "1,2;x"][..], "`x` in group 2"),
            (
                &["--clients", "2", "--classes", "1;2;3"][..],
                "--clients 2 but --classes gives 3 groups",
            ),
            (
                &["--sel-prob", "1.5"][..],
                "--sel-prob must be a probability",
            ),
            (&["--def-prob=-0.1"][..], "--def-prob must be a probability"),
            (&["--clients", "0"][..], "--clients must be at least 1"),
            (&["--rounds", "0"][..], "--rounds must be at least 1"),
            (
                &["--noisy-clients", "2", "--byzantine-clients", "2"][..],
                "exceeds the 3 clients",
            ),
            (&["--local-epochs", "0"][..], "local_epochs"),
            (
                &["--aggregation", "/nonexistent.toml"][..],
                "--aggregation /nonexistent.toml",
            ),
            (
                &["--personalization", "fedselect", "--personal-fraction", "1"][..],
                "--personal-fraction: personal fraction must be in [0, 1)",
            ),
            (
                &[
                    "--personalization",
                    "fedselect",
                    "--personal-tensor",
                    "fc3.bias=0.5",
                ][..],
                "--personal-tensor: a personal fraction is set for tensor `fc3.bias`",
            ),
            (
                &[
                    "--personalization",
                    "fedselect",
                    "--personal-tensor",
                    "fc2.bias=1",
                ][..],
                "--personal-tensor: tensor `fc2.bias`: personal fraction must be in [0, 1)",
            ),
            (
                &[
                    "--personalization",
                    "fedselect",
                    "--personal-tensor",
                    "fc2.bias",
                ][..],
                "expected NAME=FRACTION",
            ),
            (
                &[
                    "--personalization",
                    "fedselect",
                    "--aggregation",
                    "../../examples/aggregation/median.toml",
                ][..],
                "does not combine with `median`",
            ),
        ] {
            let err = format!("{:#}", resolve(flags).unwrap_err());
            assert!(err.contains(want), "{flags:?}: {err}");
        }
    }
}
