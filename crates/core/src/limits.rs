//! Bounds on untrusted input. Defaults are generous for real models and small
//! enough that a hostile file cannot make the server allocate gigabytes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest safetensors JSON header accepted, in bytes. The format allows
    /// 100 MB; real headers are kilobytes, so 16 MiB leaves room for
    /// models with hundreds of thousands of tensors.
    pub max_header_bytes: u64,
    /// Most tensors one model may hold.
    pub max_tensors: usize,
    /// Largest `num_examples` a client may claim. A client claiming 10^12
    /// examples would otherwise take over the weighted average.
    pub max_num_examples: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024 * 1024,
            max_tensors: 100_000,
            max_num_examples: 1_000_000_000,
        }
    }
}
