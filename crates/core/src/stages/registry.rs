//! Every stage kind, its phase and its constructor: adding a stage is its
//! file plus one line here.

use super::{Phase, Stage, StageTable};

/// Builds a stage from its `[[stages]]` table (parameters and checks are
/// the stage's own).
pub type Constructor = fn(&StageTable) -> Result<Stage, String>;

pub struct Entry {
    pub kind: &'static str,
    pub phase: Phase,
    pub build: Constructor,
}

const fn entry(kind: &'static str, phase: Phase, build: Constructor) -> Entry {
    Entry { kind, phase, build }
}

pub const STAGES: &[Entry] = &[
    entry("clip", Phase::Transform, super::clip::Clip::stage),
    entry(
        "adaptive_clip",
        Phase::Transform,
        super::adaptive_clip::AdaptiveClip::stage,
    ),
    entry("zeroing", Phase::Transform, super::zeroing::Zeroing::stage),
    entry("mean", Phase::Combine, super::mean::Mean::stage),
    entry("median", Phase::Combine, super::median::Median::stage),
    entry(
        "trimmed_mean",
        Phase::Combine,
        super::trimmed_mean::TrimmedMean::stage,
    ),
    entry("krum", Phase::Combine, super::krum::Krum::stage),
    entry("dp_noise", Phase::Noise, super::dp_noise::DpNoise::stage),
    entry(
        "fedavgm",
        Phase::ServerOptimizer,
        super::server_optimizer::fedavgm,
    ),
    entry(
        "fedadam",
        Phase::ServerOptimizer,
        super::server_optimizer::fedadam,
    ),
    entry(
        "fedyogi",
        Phase::ServerOptimizer,
        super::server_optimizer::fedyogi,
    ),
    entry(
        "fedadagrad",
        Phase::ServerOptimizer,
        super::server_optimizer::fedadagrad,
    ),
];

pub fn lookup(kind: &str) -> Result<&'static Entry, String> {
    STAGES.iter().find(|e| e.kind == kind).ok_or_else(|| {
        let known: Vec<&str> = STAGES.iter().map(|e| e.kind).collect();
        format!(
            "unknown stage kind `{kind}`; known kinds: {}",
            known.join(", ")
        )
    })
}

/// The kinds of one phase, for error messages.
pub fn kinds_of(phase: Phase) -> String {
    let kinds: Vec<&str> = STAGES
        .iter()
        .filter(|e| e.phase == phase)
        .map(|e| e.kind)
        .collect();
    kinds.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_unique() {
        for (i, a) in STAGES.iter().enumerate() {
            assert!(
                STAGES[i + 1..].iter().all(|b| b.kind != a.kind),
                "{}",
                a.kind
            );
        }
    }
}
