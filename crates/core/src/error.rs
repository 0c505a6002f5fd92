//! Error types. Every message names the input (file or client), the tensor
//! where there is one, and the rule that was broken, because these errors are
//! shown to operators who must fix a client, not read a backtrace.

/// Something is wrong with one safetensors file. Display names the problem;
/// callers add which client or path it came from.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("file is {len} bytes, shorter than the 8-byte header length prefix (truncated?)")]
    TooShort { len: u64 },
    #[error("header length {declared} bytes exceeds the limit of {limit} bytes (header bomb?)")]
    HeaderTooLarge { declared: u64, limit: u64 },
    #[error(
        "header length {declared} bytes runs past the end of the {file_len}-byte file (truncated?)"
    )]
    HeaderBeyondFile { declared: u64, file_len: u64 },
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("tensor data should be {expected} bytes by the header but the file holds {actual} (truncated or padded?)")]
    DataSizeMismatch { expected: u64, actual: u64 },
    #[error("{count} tensors exceeds the limit of {limit}")]
    TooManyTensors { count: usize, limit: usize },
    #[error("tensor `{tensor}` has dtype {dtype}, which fedstep can neither average (F64/F32/F16/BF16) nor carry over (integers, BOOL)")]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("tensor `{tensor}` is missing (the reference model has it)")]
    MissingTensor { tensor: String },
    #[error("tensor `{tensor}` is not in the reference model")]
    UnexpectedTensor { tensor: String },
    #[error("tensor `{tensor}` has shape {actual:?}, the reference has {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{tensor}` has dtype {actual}, the reference has {expected}")]
    DtypeMismatch {
        tensor: String,
        expected: String,
        actual: String,
    },
    #[error("tensor `{tensor}` holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f64,
    },
}

/// Why a whole aggregation could not produce a model (as opposed to one
/// update being rejected, which is recorded in the measurements and does not
/// stop the round).
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("global model {name}: {source}")]
    Global { name: String, source: ModelError },
    #[error("server state {name}: {reason}")]
    ServerState { name: String, reason: String },
    #[error("no usable update: {0}")]
    NoUsableUpdate(String),
    #[error("writing {name}: {source}")]
    Output {
        name: String,
        source: std::io::Error,
    },
    /// A read failed for the system's reasons (see [`crate::bytes::Unavailable`]):
    /// no input is blamed, the whole aggregation is worth retrying.
    #[error("reading {name}: {reason}")]
    Unavailable { name: String, reason: String },
}
