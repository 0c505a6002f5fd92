//! fedstep's built-in local trainer.
//!
//! `fedstep simulate` and the client binary need a real model trained on
//! real data without Python: this crate ships the UCI digits, loads MNIST
//! IDX files, carves datasets into non-IID client shares, and trains a
//! small MLP with candle. Models cross the crate boundary only as
//! safetensors bytes with fixed tensor names (see [`model`]), the same
//! format the aggregator consumes, so the trainer and the aggregation can
//! evolve independently.
//!
//! A federated round by hand:
//! ```
//! use fedstep_trainer::*;
//! let data = bundled_digits()?;
//! let cfg = TrainConfig { local_epochs: 1, ..TrainConfig::default() };
//! let global = init_model(data.dim(), cfg.hidden, data.classes(), cfg.seed)?;
//! let parts = partition(&data, &default_clients(), 0)?;
//! let outcome = train_local(&global, &parts[0], &cfg, 1)?;
//! assert_eq!(outcome.num_examples, parts[0].len());
//! let eval = evaluate(&outcome.model_bytes, &data)?;
//! assert!(eval.accuracy > 0.1);
//! # Ok::<(), TrainerError>(())
//! ```

pub mod correction;
pub mod dataset;
pub mod digits;
pub mod error;
pub mod eval;
pub mod idx;
pub mod model;
pub mod noise;
pub mod scaffold;
mod seed;
pub mod split;
pub mod train;

pub use dataset::Dataset;
pub use digits::{bundled_digits, load_digits_csv, parse_digits_csv};
pub use error::{Result, TrainerError};
pub use eval::{evaluate, evaluate_params, Eval};
pub use idx::{load_mnist_idx, parse_mnist_idx};
pub use model::{init_model, MlpParams, MlpShape, TENSOR_NAMES};
pub use noise::shuffle_labels;
pub use scaffold::{client_variate_update, ScaffoldOutcome};
pub use split::{
    default_clients, federated_split, partition, partition_indices, train_test_split, ClientData,
    ClientSpec, FederatedData,
};
pub use train::{train_local, train_params, train_scaffold, TrainConfig, TrainOutcome};
