//! The operator CLI's integration tests, one module per concern, in one
//! test binary (one link of the CLI's dependencies instead of three).

mod abuse_cli;
mod infra_client_config;
mod simulate;
