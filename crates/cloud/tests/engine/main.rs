//! The round engine's integration tests, in memory (no AWS): one module per
//! scenario in one test binary, so fedstep-cloud, the core and tokio are
//! linked into one executable instead of thirteen (a cold CI build spent
//! about 17 s of CPU per binary). The seeded fault-schedule harness
//! (`../harness/`) is shared with crates/aws's emulator run of the same
//! schedules.

#[path = "../harness/mod.rs"]
mod harness;

mod abuse_rows;
mod async_schedules;
mod asynchronous;
mod callback_after_crash;
mod deadline;
mod exactly_once;
mod fault_schedules;
mod foreign_rows;
mod full_job;
mod measurements_kept;
mod rejections;
mod report_failure;
mod rewritten_rows;
mod round_figures;
mod scaffold;
mod secure_phases;
mod sharded;
mod stop_and_restart;
mod takeover;
