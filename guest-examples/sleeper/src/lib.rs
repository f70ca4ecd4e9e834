//! Sleeper: sleeps for the input's milliseconds (parked in a WASI poll, not running wasm), then returns.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

struct Sleeper;

impl Guest for Sleeper {
    fn run(input: String) -> Result<String, String> {
        let ms: u64 = input
            .trim()
            .parse()
            .map_err(|e| format!("input must be milliseconds: {e}"))?;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok(format!("slept {ms} ms"))
    }
}

export!(Sleeper);
