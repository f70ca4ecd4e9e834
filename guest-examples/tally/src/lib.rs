//! Tally: counts its own runs in a global, so a test can tell a reused
//! (warm) instance from a fresh one. Answers `runs=N` (N = runs of this
//! instance, this one included) after doing what its input says:
//! `log:TEXT` logs TEXT and prints it to stdout; `grow:MIB` allocates MIB
//! MiB more and keeps them for the instance's life; `spin` loops forever
//! (stopped by fuel, the deadline or cancellation); `trap` panics; `fail`
//! returns `Err` (still a clean end); anything else does nothing more.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::log::{Level, write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

static RUNS: AtomicU64 = AtomicU64::new(0);
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

struct Tally;

impl Guest for Tally {
    fn run(input: String) -> Result<String, String> {
        let runs = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
        let answer = format!("runs={runs}");
        if let Some(text) = input.strip_prefix("log:") {
            write(Level::Info, text);
            println!("{text}");
        } else if let Some(mib) = input.strip_prefix("grow:") {
            let mib: usize = mib.parse().map_err(|e| format!("grow MIB: {e}"))?;
            let mut held = HELD.lock().map_err(|_| "poisoned".to_string())?;
            for _ in 0..mib {
                // Non-zero bytes: every page is really touched.
                held.push(std::hint::black_box(vec![0xA5u8; 1 << 20]));
            }
        } else if input == "spin" {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        } else if input == "trap" {
            panic!("tally was told to trap");
        } else if input == "fail" {
            return Err(answer);
        }
        Ok(answer)
    }
}

export!(Tally);
