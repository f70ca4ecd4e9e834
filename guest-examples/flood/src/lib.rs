//! Flood: writes MIB MiB to stdout, to stderr and through `log.write`
//! (input MIB), then returns: the host must keep only its bounded capture.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::log::{Level, write};
use std::io::Write;

struct Flood;

impl Guest for Flood {
    fn run(input: String) -> Result<String, String> {
        let mib: usize = input
            .trim()
            .parse()
            .map_err(|e| format!("input must be MiB: {e}"))?;
        let line = "x".repeat(1023) + "\n";
        for _ in 0..mib * 1024 {
            let _ = std::io::stdout().write_all(line.as_bytes());
            let _ = std::io::stderr().write_all(line.as_bytes());
            write(Level::Info, &line);
        }
        Ok(format!("flooded {mib} MiB"))
    }
}

export!(Flood);
