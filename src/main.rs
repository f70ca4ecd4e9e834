//! The `agentplane` binary: parse the command line, set up logging, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = agentplane::cli::Cli::parse();
    agentplane::cli::init_tracing();
    agentplane::cli::run(cli)
}
