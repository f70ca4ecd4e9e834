fn main() -> std::process::ExitCode {
    agentplane::cli::main()
}
