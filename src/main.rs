//! The `agentplane` binary: parse the command line, set up logging, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // The compile child (see `host::CompileChild`): before anything else,
    // so it parses no flags and starts no logging.
    if let Some(code) = agentplane::host::compile_child_main() {
        return code;
    }
    let cli = agentplane::cli::Cli::parse();
    agentplane::cli::init_tracing();
    agentplane::cli::run(cli)
}
