//! One error type for the crate, so callers (the CLI's `simulate`, the
//! client binary) can report any failure with a single `?` and a message
//! that already says where the problem is (file, line, field, tensor).

use std::path::PathBuf;

/// Everything that can go wrong while loading data or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A dataset file could not be read at all.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A text dataset line is malformed. `field` is 1-based and absent when
    /// the whole line is wrong (e.g. wrong number of fields).
    #[error("{file}:{line}{}: {message}", field.map(|f| format!(": field {f}")).unwrap_or_default())]
    Csv {
        file: String,
        line: usize,
        field: Option<usize>,
        message: String,
    },

    /// An IDX (MNIST) file has a bad header, length or content.
    #[error("{file}: {message}")]
    Idx { file: String, message: String },

    /// A dataset violates its own invariants (lengths, label range, ...).
    #[error("invalid dataset: {0}")]
    Dataset(String),

    /// A split or partition was asked for with impossible parameters.
    #[error("invalid split: {0}")]
    Split(String),

    /// A model's safetensors bytes do not describe the expected MLP.
    #[error("invalid model: {0}")]
    Model(String),

    /// The model and the dataset disagree (input width, class count).
    #[error("model/data mismatch: {0}")]
    Mismatch(String),

    /// A training configuration value is out of range.
    #[error("invalid training config: {0}")]
    Config(String),

    /// The tensor library failed; with valid inputs this indicates a bug.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Crate-wide result alias.
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
