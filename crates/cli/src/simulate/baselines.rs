//! What the federation is measured against, on the same epoch budget
//! (rounds × local epochs) and from the same initial model:
//! - the single-agent baseline: agent 1 alone on the data it trains on in
//!   the federation (what it gets without federating);
//! - the centralized upper bound: all training data in one place (what
//!   federation would reach if the data could be pooled).
//!
//! Both train round by round (local_epochs per round, continuing from their
//! own model; plain SGD keeps no state between calls, so this is the same
//! as one long run) to give a curve for the plot.

use anyhow::Result;
use fedstep_trainer::{evaluate_params, train_params, Dataset, MlpParams, TrainConfig};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    pub accuracy: f64,
    pub loss: f64,
}

/// Test accuracy and loss after each round.
pub fn curve(
    init: &[u8],
    data: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    rounds: u32,
    stream: u64,
) -> Result<Vec<Point>> {
    let mut params = MlpParams::from_safetensors(init)?;
    let mut points = Vec::with_capacity(rounds as usize);
    for round in 1..=u64::from(rounds) {
        params = train_params(&params, data, cfg, stream * 1_000_000 + round)?.0;
        let e = evaluate_params(&params, test)?;
        points.push(Point {
            accuracy: e.accuracy,
            loss: e.loss,
        });
    }
    Ok(points)
}

#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    pub single_agent: Vec<Point>,
    pub centralized: Vec<Point>,
}

pub fn run(
    init: &[u8],
    agent: &Dataset,
    all: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    rounds: u32,
) -> Result<Baselines> {
    Ok(Baselines {
        single_agent: curve(init, agent, test, cfg, rounds, 1)?,
        centralized: curve(init, all, test, cfg, rounds, 2)?,
    })
}
