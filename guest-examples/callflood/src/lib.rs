//! Callflood: calls the host (`state.get`, `log.write`, `context.tools`) N
//! times in a tight loop (input N): every host call must cost fuel.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::{context, log, state};

struct Callflood;

impl Guest for Callflood {
    fn run(input: String) -> Result<String, String> {
        let n: u64 = input
            .trim()
            .parse()
            .map_err(|e| format!("input must be a count: {e}"))?;
        let mut seen = 0usize;
        for _ in 0..n {
            seen += state::get().map_or(0, |s| s.len());
            log::write(log::Level::Debug, "");
            seen += context::tools().len();
        }
        Ok(format!("{n} calls, {seen}"))
    }
}

export!(Callflood);
