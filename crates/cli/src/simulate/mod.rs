//! `fedstep simulate`: a whole federation in one process — the cloud
//! path's round engine and aggregation over local adapters, built-in
//! clients training fedstep-trainer's MLP on a non-IID split — with a
//! per-round table, the single-agent and centralized baselines, report.json
//! and accuracy.svg in the run directory.
//!
//! Map: [`args`] (flags and their checks) · [`classes`] (`--classes`) ·
//! [`data`] (dataset, split, client shares) · [`client`] (one client's
//! round over the ports) · [`attack`] (byzantine updates) · [`runner`]
//! (the engine driver) · [`baselines`] · [`measurements`] (per-client
//! report rows) · [`personal`] (FedSelect's per-client yardstick) ·
//! [`asynchronous`] (`--mode async` on a simulated clock) ·
//! [`report`] (report.json) · [`table`] · [`plot`] ·
//! [`progress`] · [`timestamp`].

mod args;
mod asynchronous;
mod attack;
mod baselines;
mod classes;
mod client;
mod data;
mod measurements;
mod personal;
mod plot;
mod progress;
mod report;
mod runner;
mod secure;
mod table;
mod timestamp;

pub use args::Args;

pub fn run(args: Args) -> anyhow::Result<()> {
    let settings = args.resolve()?;
    // The digits MLP is too small for candle's multi-threaded matmul (it
    // loses to its own overhead); clients already run in parallel, so each
    // trains single-threaded unless the user says otherwise. Set before any
    // thread exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(runner::run(settings))
}
