//! Derivation of independent, reproducible random streams from one seed.
//!
//! Every random decision in the crate (split, partition, weight init,
//! minibatch order) draws from its own ChaCha stream keyed by
//! `(seed, purpose, index)`. Keeping them separate means changing, say, the
//! number of local epochs does not silently reshuffle the data partition,
//! and results never depend on a process-global RNG.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a stream is used for; part of the ChaCha key.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub(crate) enum Purpose {
    TrainTestSplit = 1,
    PartitionTrain = 2,
    PartitionTest = 3,
    LabelShuffle = 4,
    WeightInit = 5,
    Minibatch = 6,
}

/// A generator for `(seed, purpose, index)`. Distinct triples give distinct
/// key/stream pairs, hence statistically independent sequences.
pub(crate) fn rng(seed: u64, purpose: Purpose, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(purpose as u64).to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(index);
    rng
}
