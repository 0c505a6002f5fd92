//! The end-to-end harness: each scenario deploys its own copy of the stack
//! on the emulators (`scripts/local-deploy.sh --prefix <unique>`; the worker
//! takes every activity task of its deployment, so scenarios cannot share
//! one), runs the REAL binaries as processes (`fedstep-lambda local`,
//! `fedstep-client run`, `fedstep job start`), and checks what they left in
//! S3, DynamoDB and the Step Functions history.
//!
//! Setup: the emulators (`scripts/emulators.sh up`) and the release
//! binaries (`cargo build --release -p fedstep -p fedstep-client -p
//! fedstep-lambda`; `scripts/test.sh` builds them and sets
//! `FEDSTEP_BIN_DIR`). Endpoints come from the standard AWS_* variables, or
//! from `scripts/emulators.sh env` when AWS_ENDPOINT_URL is unset.
//! Unreachable emulators: with `CI=true` the tests FAIL, otherwise they
//! print why and skip. Missing binaries always fail.

pub mod binaries;
pub mod client_config;
pub mod deployment;
pub mod emulators;
pub mod execution;
pub mod fedavg;
pub mod launch;
pub mod log_times;
pub mod masked_fedavg;
pub mod process;

pub use binaries::Binaries;
pub use deployment::Deployment;
pub use process::Process;

/// The repository root (tests/e2e/../..).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// Ids unique across runs and processes (job ids, deployment prefixes).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}{}",
        std::process::id() % 10_000,
        nanos % 1_000_000_000
    )
}
