//! Counter: reads its durable state as a decimal u64, increments it, stores it and returns it.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::state;

struct Counter;

impl Guest for Counter {
    fn run(_input: String) -> Result<String, String> {
        let current = match state::get() {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or("state is not a decimal u64")?,
        };
        let next = current + 1;
        state::set(next.to_string().as_bytes())?;
        Ok(next.to_string())
    }
}

export!(Counter);
