//! Asynchronous (buffered, FedBuff-style) aggregation's numeric pieces.
//!
//! In async mode a version's buffer holds updates trained from older
//! versions. An update x trained from version b, counted into the buffer of
//! version r (staleness τ = r − b), enters the aggregation as the model
//!
//! ```text
//! x' = g_r + s(τ) · (x − g_b)
//! ```
//!
//! so that the pipeline's weighted mean Σ wᵢ x'ᵢ / Σ wᵢ is
//! g_r + Σ (wᵢ/W) s(τᵢ) Δᵢ: FedBuff's staleness-discounted mean of the
//! clients' deltas (Nguyen et al., AISTATS 2022, with the type-aware
//! weights in place of its uniform 1/K), applied to the newest version.
//! Every stage downstream (clipping, DP noise, robust combiners, server
//! optimizers) then sees an ordinary update whose delta is s(τ)·Δ, which is
//! why async needs no stage of its own. An update with τ = 0 is not rebased
//! at all (g + (x − g) is not x bit for bit in floating point).
//!
//! [`Staleness`] is the discount s(τ); [`Rebased`] presents x' as a byte
//! source with x's layout, computed block by block from three positioned
//! reads, so nothing is staged and the core reads it like any input.

mod rebased;
mod weighting;

pub use rebased::Rebased;
pub use weighting::Staleness;
