//! Secure aggregation jobs (issue #18): the job file's
//! `[secure_aggregation]` table, parsed once into [`SecureSettings`].
//!
//! ```toml
//! [secure_aggregation]
//! protocol = "secagg+"       # the only one
//! neighbours = 10            # k (default 2⌈log₂ n⌉; every other client below that)
//! clip = 1.0                 # c: each coordinate of an update delta is clipped
//!                            # to [−c, c] by its client
//! quantization_bits = 16     # q: 2^q − 1 levels over [−c, c]
//! ring_bits = 32             # b (default: 32, or 64 when a sum of 32 bits could wrap)
//! max_weight = 1000000       # the largest weight a client may premultiply
//! min_survivors = 3          # fewer clients left after any phase fail the round
//!                            # (default: the larger of 3 and min_clients)
//! ```
//!
//! The aggregator sees only the weighted sum, so every stage that needs
//! one client's update is refused here with the reason: server-side
//! clipping and zeroing (and so DP noise, which is calibrated to a server
//! clip), robust combiners, FedSelect, SCAFFOLD's variates and async
//! rebasing. The mean and the server optimizers run on the sum.
//!
//! The round engine does not drive SecAgg+'s phases yet: a job with this
//! table passes [`check`] and is then refused where it would start
//! ([`SecureSettings::NOT_RUNNABLE_YET`]).

use fedstep_core::personalization::Personalization;
use fedstep_core::weighting::{TypeFilter, Weighting};
use fedstep_core::PipelineConfig;
use fedstep_secagg::params::{default_neighbours, degree_for, threshold_for_degree};
use fedstep_secagg::QuantizationConfig;
use serde::{Deserialize, Serialize};

use crate::asynchronous::JobMode;

/// `protocol`: which secure aggregation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Bell et al., CCS 2020 (`crates/secagg`).
    #[default]
    #[serde(rename = "secagg+")]
    SecAggPlus,
}

/// The `[secure_aggregation]` table as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SecureSpec {
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<usize>,
    /// Accepted only as what the neighbourhood implies (⌊2d/3⌋ + 1): the
    /// protocol's guarantee rests on 2t > d (ARCHITECTURE.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_bits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_bits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_survivors: Option<u32>,
}

/// A checked `[secure_aggregation]`: what every round's SecAgg+ parameters
/// are made from.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSettings {
    pub protocol: Protocol,
    /// The neighbour graph's degree d (k rounded up to even, at most n − 1).
    pub degree: usize,
    /// t = ⌊2d/3⌋ + 1 shares rebuild a secret.
    pub threshold: usize,
    pub quantization: QuantizationConfig,
    pub min_survivors: u32,
}

impl SecureSettings {
    pub const DEFAULT_CLIP: f32 = 1.0;
    pub const DEFAULT_QUANTIZATION_BITS: u32 = 16;
    /// A million examples; uniform weighting's weights are all 1.
    pub const DEFAULT_MAX_WEIGHT: u64 = 1_000_000;
    /// SecAgg+ never sums fewer inputs than this (a sum of two reveals
    /// each to the other).
    pub const MIN_SURVIVORS: u32 = 3;
    /// The largest neighbourhood GF(2^8) Shamir shares can serve.
    pub const MAX_NEIGHBOURS: usize = 255;
    /// Why a job with secure aggregation is refused where it would start.
    pub const NOT_RUNNABLE_YET: &'static str =
        "[secure_aggregation] is checked, but the round engine does not run SecAgg+'s phases \
         yet (issue #18): `fedstep simulate --secure-aggregation` runs the protocol in process";
}

/// Checks `[secure_aggregation]` against the rest of the job; `None` when
/// the table is absent.
pub fn check(
    spec: Option<&SecureSpec>,
    clients: usize,
    min_clients: u32,
    mode: JobMode,
    scaffold: bool,
    pipeline: &PipelineConfig,
) -> Result<Option<SecureSettings>, String> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    if clients < SecureSettings::MIN_SURVIVORS as usize {
        return Err(format!(
            "[secure_aggregation] needs at least {} clients: a sum of fewer reveals one",
            SecureSettings::MIN_SURVIVORS
        ));
    }
    refuse_what_needs_one_update(mode, scaffold, pipeline)?;
    let k = spec
        .neighbours
        .unwrap_or_else(|| default_neighbours(clients));
    if !(2..=SecureSettings::MAX_NEIGHBOURS).contains(&k) {
        return Err(format!(
            "[secure_aggregation] neighbours = {k} must be between 2 and {} (Shamir over GF(2^8))",
            SecureSettings::MAX_NEIGHBOURS
        ));
    }
    let degree = degree_for(clients, k);
    let threshold = threshold_for_degree(degree);
    if let Some(t) = spec.threshold.filter(|&t| t != threshold) {
        return Err(format!(
            "[secure_aggregation] threshold = {t}: with {degree} neighbours it is {threshold} \
             (⌊2d/3⌋ + 1, so that any two quorums of a client's neighbours overlap); leave it \
             out or change neighbours"
        ));
    }
    let max_weight = match pipeline.weighting() {
        Weighting::Uniform => 1,
        _ => spec
            .max_weight
            .unwrap_or(SecureSettings::DEFAULT_MAX_WEIGHT),
    };
    let clip = spec.clip.unwrap_or(SecureSettings::DEFAULT_CLIP);
    let q = spec
        .quantization_bits
        .unwrap_or(SecureSettings::DEFAULT_QUANTIZATION_BITS);
    let n = clients as u64;
    let quantization = match spec.ring_bits {
        Some(b) => QuantizationConfig::new(clip, q, b, max_weight, n),
        None => QuantizationConfig::narrowest(clip, q, max_weight, n),
    }
    .map_err(|e| format!("[secure_aggregation] {e}"))?;
    let min_survivors = spec
        .min_survivors
        .unwrap_or(min_clients.max(SecureSettings::MIN_SURVIVORS));
    if min_survivors < SecureSettings::MIN_SURVIVORS || min_survivors as usize > clients {
        return Err(format!(
            "[secure_aggregation] min_survivors = {min_survivors} must be between {} and the {clients} clients",
            SecureSettings::MIN_SURVIVORS
        ));
    }
    if min_survivors < min_clients {
        return Err(format!(
            "[secure_aggregation] min_survivors = {min_survivors} is below min_clients = \
             {min_clients}: a round would unmask a sum its quorum then refuses"
        ));
    }
    Ok(Some(SecureSettings {
        protocol: spec.protocol,
        degree,
        threshold,
        quantization,
        min_survivors,
    }))
}

/// Everything that needs one client's update, refused with the reason.
fn refuse_what_needs_one_update(
    mode: JobMode,
    scaffold: bool,
    config: &PipelineConfig,
) -> Result<(), String> {
    let refuse = |what: &str, why: &str| {
        Err(format!(
            "[secure_aggregation] with {what}: {why}; the aggregator sees only the sum"
        ))
    };
    if mode == JobMode::Async {
        return refuse(
            "mode = \"async\"",
            "a stale update is rebased onto the newest model one by one",
        );
    }
    if scaffold {
        return refuse(
            "round_config.algorithm = \"scaffold\"",
            "the server variate is made from each client's Δc_i",
        );
    }
    if config.personalization() == Personalization::Fedselect {
        return refuse(
            "personalization = \"fedselect\"",
            "each client's mask chooses which of its elements enter the mean",
        );
    }
    if config.weighting() == Weighting::Quality {
        return refuse(
            "weighting = \"quality\"",
            "a client premultiplies its weight as an integer, and type-aware weights are real \
             numbers (a fixed-point encoding of them is not built yet)",
        );
    }
    if config.max_client_share().is_some() {
        return refuse(
            "max_client_share",
            "capping a share reweights a client's update after it is masked",
        );
    }
    if config.type_filter() != TypeFilter::None {
        return refuse(
            &format!("type_filter = \"{}\"", config.type_filter_name()),
            "the filter picks updates by type as they are aggregated (choosing the inputs \
             before they are masked is not built yet)",
        );
    }
    let p = config.pipeline();
    if let Some(t) = p.transforms.first() {
        return refuse(
            &format!("the `{}` stage", t.kind()),
            "it clips, zeroes or measures each update on the server (clip on the clients with \
             [secure_aggregation] clip instead; DP noise needs a server-side clip too)",
        );
    }
    if p.combiner_name() != "mean" {
        return refuse(
            &format!("the `{}` combiner", p.combiner_name()),
            "a robust combiner compares the updates themselves",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(secure: &str, aggregation: &str, extra: &str) -> Result<SecureSettings, String> {
        let spec: SecureSpec = toml::from_str(secure).map_err(|e| e.to_string())?;
        let pipeline = PipelineConfig::from_toml(aggregation)?;
        let (mode, scaffold) = match extra {
            "async" => (JobMode::Async, false),
            "scaffold" => (JobMode::Sync, true),
            _ => (JobMode::Sync, false),
        };
        check(Some(&spec), 8, 2, mode, scaffold, &pipeline).map(|s| s.expect("a table"))
    }

    #[test]
    fn defaults_are_secaggplus_with_a_logarithmic_neighbourhood() {
        let s = checked("", "", "").unwrap();
        assert_eq!(s.protocol, Protocol::SecAggPlus);
        // 8 clients: k = 2⌈log₂ 8⌉ = 6, t = ⌊12/3⌋ + 1 = 5.
        assert_eq!((s.degree, s.threshold, s.min_survivors), (6, 5, 3));
        // 8 × 10^6 × 65535 needs more than 32 bits.
        assert_eq!(s.quantization.ring().bits(), 64);
        let uniform = checked("", "weighting = \"uniform\"", "").unwrap();
        assert_eq!(uniform.quantization.ring().bits(), 32);
    }

    #[test]
    fn the_mean_and_server_optimizers_run_on_the_sum() {
        let s = checked(
            "neighbours = 100\nthreshold = 5\nring_bits = 64\nmin_survivors = 4",
            "[[stages]]\nkind = \"fedadam\"\nlearning_rate = 0.01",
            "",
        )
        .unwrap();
        // Every other client: d = n − 1 = 7, t = 5.
        assert_eq!((s.degree, s.threshold, s.min_survivors), (7, 5, 4));
    }

    #[test]
    fn what_needs_one_update_is_refused_with_the_reason() {
        for (aggregation, extra, says) in [
            (
                "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0",
                "",
                "`clip` stage",
            ),
            ("[[stages]]\nkind = \"median\"", "", "`median` combiner"),
            (
                "[[stages]]\nkind = \"krum\"\nbyzantine = 1",
                "",
                "`krum` combiner",
            ),
            ("personalization = \"fedselect\"", "", "fedselect"),
            ("weighting = \"quality\"", "", "quality"),
            ("max_client_share = 0.5", "", "max_client_share"),
            ("type_filter = \"auto\"", "", "type_filter"),
            ("", "async", "async"),
            ("", "scaffold", "scaffold"),
        ] {
            let err = checked("", aggregation, extra).unwrap_err();
            assert!(
                err.starts_with("[secure_aggregation] with") && err.contains(says),
                "{aggregation} {extra}: {err}"
            );
        }
    }

    #[test]
    fn contradictory_settings_are_named() {
        for (secure, says) in [
            ("protocol = \"secagg\"", "unknown variant"),
            ("neighbours = 1", "neighbours = 1"),
            ("neighbours = 300", "GF(2^8)"),
            ("threshold = 3", "threshold = 3"),
            ("clip = -1.0", "clip"),
            ("ring_bits = 32", "wrap"),
            ("min_survivors = 2", "min_survivors = 2"),
            ("min_survivors = 9", "the 8 clients"),
            ("shares = 4", "unknown field"),
        ] {
            let err = checked(secure, "", "").unwrap_err();
            assert!(err.contains(says), "{secure}: {err}");
        }
        // min_clients = 2 here; a quorum above the survivors is refused.
        let spec: SecureSpec = toml::from_str("min_survivors = 3").unwrap();
        let err = check(
            Some(&spec),
            8,
            5,
            JobMode::Sync,
            false,
            &PipelineConfig::default(),
        )
        .unwrap_err();
        assert!(err.contains("below min_clients = 5"), "{err}");
        let err = check(
            Some(&SecureSpec::default()),
            2,
            1,
            JobMode::Sync,
            false,
            &PipelineConfig::default(),
        )
        .unwrap_err();
        assert!(err.contains("at least 3 clients"), "{err}");
    }
}
