//! `agentplane random-model DIR`: a model of random weights to try
//! `--model` with, nothing downloaded (`inference::random`).

use crate::inference::random::{self, Shape};
use clap::Args;
use std::process::ExitCode;

/// `agentplane random-model DIR`.
#[derive(Debug, Clone, Args)]
pub struct RandomModelArgs {
    /// Directory to write the model to (created if missing).
    pub dir: std::path::PathBuf,
    /// Width of the model (a multiple of 8).
    #[arg(long, default_value_t = Shape::TINY.hidden)]
    pub hidden: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = Shape::TINY.layers)]
    pub layers: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes the model and prints `{"dir","bytes"}`.
pub fn random_model(a: &RandomModelArgs) -> anyhow::Result<ExitCode> {
    let shape = Shape {
        hidden: a.hidden,
        layers: a.layers,
        intermediate: 2 * a.hidden,
        ..Shape::TINY
    };
    random::write(&a.dir, shape, a.seed)?;
    println!(
        "{}",
        serde_json::json!({"dir": a.dir, "bytes": shape.bytes()})
    );
    Ok(ExitCode::SUCCESS)
}
