//! Bigstate: asks `state.set` to store MIB MiB (input MIB) and reports the answer.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::state;

struct Bigstate;

impl Guest for Bigstate {
    fn run(input: String) -> Result<String, String> {
        let mib: usize = input
            .trim()
            .parse()
            .map_err(|e| format!("input must be MiB: {e}"))?;
        let value = vec![0x42u8; mib << 20];
        state::set(&value)?;
        Ok(format!("stored {mib} MiB"))
    }
}

export!(Bigstate);
