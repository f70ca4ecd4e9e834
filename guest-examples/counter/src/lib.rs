//! Counter: reads its durable state as a decimal u64, increments it, stores it and returns it.
//!
//! Input `pad:N:TEXT` (optional) stores the count followed by a newline and N
//! bytes of TEXT repeated, to exercise agent states above the inline
//! threshold (64 KiB); only the leading decimal is read back.
//!
//! Input `sleep:MS` waits MS ms between reading the state and storing the
//! next one, so that another job of the same agent can commit meanwhile
//! (an agent-state conflict on demand).

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::state;

struct Counter;

impl Guest for Counter {
    fn run(input: String) -> Result<String, String> {
        let current = match state::get() {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.split('\n').next())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or("state is not a decimal u64")?,
        };
        if let Some(ms) = input.strip_prefix("sleep:") {
            let ms: u64 = ms.parse().map_err(|e| format!("sleep ms: {e}"))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let next = current + 1;
        let mut out = next.to_string().into_bytes();
        if let Some((n, text)) = input
            .strip_prefix("pad:")
            .and_then(|rest| rest.split_once(':'))
        {
            let n: usize = n.parse().map_err(|e| format!("pad length: {e}"))?;
            let text = if text.is_empty() { "." } else { text };
            out.push(b'\n');
            out.extend(text.bytes().cycle().take(n));
        }
        state::set(&out)?;
        Ok(next.to_string())
    }
}

export!(Counter);
