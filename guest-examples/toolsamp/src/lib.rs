//! Toolsamp: calls `context.tools()` N times (input N) and reports how many
//! tools and bytes came back: with one big registry mounted under many names,
//! each call used to copy it once per name.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::context;

struct Toolsamp;

impl Guest for Toolsamp {
    fn run(input: String) -> Result<String, String> {
        let n: u64 = input
            .trim()
            .parse()
            .map_err(|e| format!("input must be a count: {e}"))?;
        let (mut tools, mut bytes) = (0usize, 0usize);
        for _ in 0..n {
            for t in context::tools() {
                tools += 1;
                bytes += t.name.len() + t.description.len() + t.schema.len();
            }
        }
        Ok(format!("{tools} tools, {bytes} bytes"))
    }
}

export!(Toolsamp);
