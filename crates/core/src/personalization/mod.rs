//! FedSelect personalization (Tamirisa et al., 2024): each client keeps a
//! data-chosen subset of every float tensor local — the elements that moved
//! most in its own training — and shares the rest; the server averages each
//! element over the clients that shared it.
//!
//! The round, from a client's point of view:
//!
//! 1. [`merge_personal`]: the new global model with the client's personal
//!    values put back (no personal file yet in round 1: train the global).
//! 2. Local training, from the merged model.
//! 3. [`split_update`]: per float tensor, [`compute_mask`] picks the top
//!    [`Ramp::at`] fraction of elements by |local − global| (the personal set
//!    only grows, as in the paper); writes the **upload** (shared values;
//!    personal elements hold the global value) and the **personal file**
//!    (personal values; shared elements hold 0), both in the
//!    [file format](mod@format).
//! 4. Upload the upload; keep the personal file. It never leaves the client.
//!
//! The server runs the masked mean ([`masked_mean`]) when the pipeline says
//! `personalization = "fedselect"`; a plain update (no masks) shares every
//! element, so personalizing and plain clients mix freely.
//!
//! Which stages combine with it, and why the others are refused, is
//! [`check_pipeline`]'s documentation.

pub mod format;
pub mod fractions;
pub mod layout;
pub mod mask;
pub mod masked_mean;
pub mod merge;
pub mod schedule;
pub mod split;

use serde::{Deserialize, Serialize};

pub use format::{read_masked, MaskedModel};
pub use fractions::PersonalFractions;
pub use layout::{check_masked_compatible, MaskedLayout};
pub use mask::compute_mask;
pub use merge::{merge_personal, MergeSummary};
pub use schedule::Ramp;
pub use split::{split_update, SplitSummary};

use crate::stages::Pipeline;

/// The pipeline's `personalization` key.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Personalization {
    /// Every update is a whole model; masks are refused as unknown tensors.
    #[default]
    None,
    /// Updates may carry shared-element masks; the mean is taken per element
    /// over the clients that shared it.
    Fedselect,
}

/// Tensor-name prefix of a mask: `__fedselect_shared__/<tensor>` is a U8
/// tensor of `<tensor>`'s shape, 1 where the element is shared (averaged
/// by the server), 0 where it is personal (kept by the client). Named for
/// what 1 means, so nobody has to remember a polarity.
pub const MASK_PREFIX: &str = "__fedselect_shared__/";

/// The mask tensor's name for model tensor `tensor`.
pub fn mask_name(tensor: &str) -> String {
    format!("{MASK_PREFIX}{tensor}")
}

/// The model tensor a mask belongs to, if `name` is a mask's name.
pub fn masked_tensor(name: &str) -> Option<&str> {
    name.strip_prefix(MASK_PREFIX)
}

/// Something wrong with a personalization input or output. Every message
/// names the file (or tensor) and the rule that was broken.
#[derive(Debug, thiserror::Error)]
pub enum PersonalizationError {
    #[error("{path}: {source}")]
    Model {
        path: std::path::PathBuf,
        source: crate::error::ModelError,
    },
    #[error("{path}: {reason}")]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// Which stages work with `personalization = "fedselect"`, checked when the
/// config is read:
///
/// - **clip, zeroing**: yes. Personal elements carry the global value, so
///   they add nothing to `local − global` and the norms are the norms of
///   what the client shares.
/// - **mean**: yes — it *is* the masked mean.
/// - **fedavgm / fedadam / fedyogi / fedadagrad**: yes; the pseudo-gradient
///   is `masked mean − global`, zero where nobody shared.
/// - **median, trimmed_mean** (and their bucketing): refused. They rank all
///   clients' values of an element; with masks each element has its own
///   set of voters, and counting personal elements (which hold the global
///   value) would be counting votes for the old model.
/// - **krum**: refused. It scores whole updates by their distances; two
///   clients personalizing different elements look far apart for reasons
///   that have nothing to do with an attack.
/// - **dp_noise**: refused. Its calibration assumes a fixed denominator;
///   the masked mean divides each element by the weight of the clients that
///   shared it, so one client alone can set an element: the sensitivity is
///   data-dependent (up to the whole clip norm) and the noise would be too
///   small.
pub fn check_pipeline(p: &Pipeline) -> Result<(), String> {
    match p
        .stages()
        .find_map(|s| s.fedselect_refusal().map(|why| (s.kind(), why)))
    {
        Some((stage, why)) => Err(format!(
            "personalization = \"fedselect\" does not combine with `{stage}`: {why}"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;

    #[test]
    fn mask_names_round_trip() {
        assert_eq!(mask_name("fc1.weight"), "__fedselect_shared__/fc1.weight");
        assert_eq!(
            masked_tensor("__fedselect_shared__/fc1.weight"),
            Some("fc1.weight")
        );
        assert_eq!(masked_tensor("fc1.weight"), None);
    }

    #[test]
    fn refuses_the_stages_it_cannot_combine_with_and_says_why() {
        let with = |stages: &str| {
            PipelineConfig::from_toml(&format!("personalization = \"fedselect\"\n{stages}"))
        };
        for (stages, want) in [
            ("[[stages]]\nkind = \"median\"", "`median`"),
            (
                "[[stages]]\nkind = \"trimmed_mean\"\nbeta = 0.2",
                "`trimmed_mean`",
            ),
            ("[[stages]]\nkind = \"krum\"\nbyzantine = 1", "`krum`"),
            (
                "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0",
                "`dp_noise`",
            ),
        ] {
            let err = with(stages).unwrap_err();
            assert!(err.contains(want) && err.contains("fedselect"), "{err}");
        }
        let ok = with(
            "[[stages]]\nkind = \"zeroing\"\nmax_norm = 10.0\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n\
             [[stages]]\nkind = \"mean\"\n[[stages]]\nkind = \"fedavgm\"",
        )
        .unwrap();
        assert_eq!(ok.personalization(), Personalization::Fedselect);
        // The same stages without personalization stay allowed.
        PipelineConfig::from_toml("[[stages]]\nkind = \"krum\"\nbyzantine = 1").unwrap();
        let err = PipelineConfig::from_toml("personalization = \"fedprox\"").unwrap_err();
        assert!(err.contains("fedprox"), "{err}");
    }
}
