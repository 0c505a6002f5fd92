//! Asynchronous (buffered, FedBuff-style) jobs: `mode = "async"` and the
//! job file's `[async]` table, parsed once into [`AsyncSettings`].
//!
//! ```toml
//! mode = "async"
//!
//! [async]
//! buffer_size = 2            # K: a version is aggregated once K updates are in
//!                            # (default: a tenth of the clients, at least min_clients)
//! staleness = "polynomial"   # or "constant", "hinge"
//! staleness_exponent = 0.5   # polynomial: s(τ) = 1/(1+τ)^a
//! hinge_slope = 1.0          # hinge: s(τ) = 1/(slope·(τ−cutoff)+1) past cutoff
//! hinge_cutoff = 4
//! max_staleness = 20         # older updates are rejected with that reason
//! server_learning_rate = 1.0 # η: each version moves the global model η of the
//!                            # way to the buffer's discounted mean
//! max_updates = 500          # optional: stop once this many updates were accepted
//! max_seconds = 86400        # optional: stop at the first version after this long
//! ```
//!
//! `rounds` caps the versions and `[stop]` applies as for rounds.
//!
//! A version is a round whose hand-over waits for K usable updates rather
//! than for every client (ARCHITECTURE.md, "Asynchronous jobs").

use fedstep_core::personalization::Personalization;
use fedstep_core::staleness::Staleness;
use fedstep_core::PipelineConfig;
use serde::{Deserialize, Serialize};

/// `mode`: whether rounds wait for every client (`sync`) or versions are
/// made from the first K updates (`async`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum JobMode {
    #[default]
    Sync,
    Async,
}

impl JobMode {
    pub fn is_sync(&self) -> bool {
        *self == JobMode::Sync
    }
}

/// The discount's form, as the job file names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StalenessForm {
    #[default]
    Polynomial,
    Constant,
    Hinge,
}

/// The `[async]` table as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AsyncSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_size: Option<u32>,
    #[serde(default)]
    pub staleness: StalenessForm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness_exponent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hinge_slope: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hinge_cutoff: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staleness: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_updates: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<u64>,
}

/// An async job's settings, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AsyncSettings {
    /// K: updates a version is made from.
    pub buffer_size: u32,
    pub staleness: Staleness,
    /// An update trained more than this many versions ago is rejected.
    pub max_staleness: u32,
    /// η: a version moves the global model η of the way to the buffer's
    /// discounted mean (applied by the job's pipeline, `Job::check`).
    pub server_learning_rate: f64,
    /// Stop once the versions so far accepted this many updates in all.
    pub max_updates: Option<u64>,
    /// Stop at the first version made this long after version 1 opened.
    pub max_seconds: Option<u64>,
}

impl AsyncSettings {
    /// Versions an update may lag behind by default: with the polynomial
    /// discount it then still weighs 1/√21 ≈ 0.22.
    pub const DEFAULT_MAX_STALENESS: u32 = 20;

    /// The largest max_staleness a job may set. StartRound of each version
    /// carries the late rows of the max_staleness + 1 versions before it,
    /// reading each of those versions, so that look-back is bounded; a
    /// larger setting would accept staleness no version ever carries (and
    /// an update 31 versions old weighs 1/√32 ≈ 0.18 by default anyway).
    pub const STALENESS_CAP: u32 = 31;

    /// η by default: a version is the buffer's discounted mean, FedBuff's
    /// η_g = 1. Measured on simulate's defaults (speeds 1,1,4, five seeds):
    /// η = 0.7 needed 1.5–2.3× the simulated time η = 1 needs to reach the
    /// target, since the staleness discount already damps stale updates;
    /// η = 1.5 was faster on the two seeds tried (0.60× and 0.50× of sync's
    /// time, against 0.80× and 0.67×) but steps past the mean, which a
    /// default should not do on the strength of one small model.
    pub const DEFAULT_SERVER_LEARNING_RATE: f64 = 1.0;

    /// K by default: a tenth of the clients, rounded up (FedBuff's K = 10
    /// with 100 clients training at once), and at least `min_clients`, the
    /// fewest a version may be made from.
    pub fn default_buffer_size(clients: usize, min_clients: u32) -> u32 {
        u32::try_from(clients.div_ceil(10).max(1))
            .unwrap_or(u32::MAX)
            .max(min_clients)
    }
}

/// Checks `mode` and `[async]` against the job: `None` for a sync job.
pub(crate) fn check(
    mode: JobMode,
    spec: Option<&AsyncSpec>,
    clients: usize,
    min_clients: u32,
    scaffold: bool,
    pipeline: &PipelineConfig,
) -> Result<Option<AsyncSettings>, String> {
    let spec = match (mode, spec) {
        (JobMode::Sync, None) => return Ok(None),
        (JobMode::Sync, Some(_)) => {
            return Err("[async] is set but mode is \"sync\": add mode = \"async\"".into())
        }
        (JobMode::Async, spec) => spec.cloned().unwrap_or_default(),
    };
    let buffer_size = spec
        .buffer_size
        .unwrap_or_else(|| AsyncSettings::default_buffer_size(clients, min_clients));
    if buffer_size == 0 || buffer_size as usize > clients {
        return Err(format!(
            "[async] buffer_size = {buffer_size} must be between 1 and the {clients} clients listed"
        ));
    }
    if min_clients > buffer_size {
        return Err(format!(
            "min_clients = {min_clients} exceeds [async] buffer_size = {buffer_size}: a version \
             is aggregated from buffer_size updates, and min_clients is the fewest a version \
             may be made from at the deadline"
        ));
    }
    let misplaced =
        |name: &str, form: &str| format!("[async] {name} applies to staleness = \"{form}\" only");
    let staleness = match spec.staleness {
        StalenessForm::Polynomial => {
            if spec.hinge_slope.is_some() || spec.hinge_cutoff.is_some() {
                return Err(misplaced("hinge_slope/hinge_cutoff", "hinge"));
            }
            Staleness::Polynomial {
                exponent: spec
                    .staleness_exponent
                    .unwrap_or(Staleness::DEFAULT_EXPONENT),
            }
        }
        StalenessForm::Constant => {
            if spec.staleness_exponent.is_some() {
                return Err(misplaced("staleness_exponent", "polynomial"));
            }
            if spec.hinge_slope.is_some() || spec.hinge_cutoff.is_some() {
                return Err(misplaced("hinge_slope/hinge_cutoff", "hinge"));
            }
            Staleness::Constant
        }
        StalenessForm::Hinge => {
            if spec.staleness_exponent.is_some() {
                return Err(misplaced("staleness_exponent", "polynomial"));
            }
            Staleness::Hinge {
                slope: spec.hinge_slope.unwrap_or(Staleness::DEFAULT_HINGE_SLOPE),
                cutoff: spec.hinge_cutoff.unwrap_or(Staleness::DEFAULT_HINGE_CUTOFF),
            }
        }
    };
    staleness.check().map_err(|e| format!("[async] {e}"))?;
    for (name, value) in [
        ("max_updates", spec.max_updates),
        ("max_seconds", spec.max_seconds),
    ] {
        if value == Some(0) {
            return Err(format!("[async] {name} must be at least 1"));
        }
    }
    // Both need one client's state across versions that async mixes up.
    if scaffold {
        return Err(
            "mode = \"async\" with round_config.algorithm = \"scaffold\": SCAFFOLD's control \
             variates assume every client's correction is computed against the same c, which a \
             stale update was not"
                .into(),
        );
    }
    if pipeline.personalization() == Personalization::Fedselect {
        return Err(
            "mode = \"async\" with personalization = \"fedselect\": a stale masked update would \
             be rebased onto elements its client never shared"
                .into(),
        );
    }
    let max_staleness = spec
        .max_staleness
        .unwrap_or(AsyncSettings::DEFAULT_MAX_STALENESS);
    if max_staleness > AsyncSettings::STALENESS_CAP {
        return Err(format!(
            "[async] max_staleness = {max_staleness} is more than {}: a version carries late \
             updates from at most {} versions back, so older ones could never be counted",
            AsyncSettings::STALENESS_CAP,
            AsyncSettings::STALENESS_CAP + 1
        ));
    }
    Ok(Some(AsyncSettings {
        buffer_size,
        staleness,
        max_staleness,
        server_learning_rate: spec
            .server_learning_rate
            .unwrap_or(AsyncSettings::DEFAULT_SERVER_LEARNING_RATE),
        max_updates: spec.max_updates,
        max_seconds: spec.max_seconds,
    }))
}

#[cfg(test)]
mod tests {
    use super::AsyncSettings;

    #[test]
    fn the_default_buffer_is_a_tenth_of_the_clients_and_at_least_the_quorum() {
        for (clients, min_clients, k) in [
            (3, 1, 1),
            (10, 1, 1),
            (11, 1, 2),
            (100, 1, 10),
            (3, 2, 2),
            (25, 1, 3),
        ] {
            assert_eq!(
                AsyncSettings::default_buffer_size(clients, min_clients),
                k,
                "{clients} {min_clients}"
            );
        }
    }
}
