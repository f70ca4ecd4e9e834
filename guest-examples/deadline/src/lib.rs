//! Deadline: computes N rounds, logs the result, then sleeps MS ms in a WASI
//! poll (input `N,MS`). With MS past the job's timeout it is the "free run":
//! the work is done and logged, and the attempt ends parked in a host call.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::log::{Level, write};

struct Deadline;

impl Guest for Deadline {
    fn run(input: String) -> Result<String, String> {
        let (rounds, ms) = input
            .split_once(',')
            .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
            .ok_or("input must be `ROUNDS,MS`")?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for r in 0..rounds {
            h ^= std::hint::black_box(r);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        write(Level::Info, &format!("result {h:016x}"));
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok(format!("{h:016x}"))
    }
}

export!(Deadline);
