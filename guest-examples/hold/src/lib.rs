//! Hold: takes `MIB,MS` as input, holds MIB MiB of memory for MS ms of busy work, then returns.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use std::time::{Duration, Instant};

struct Hold;

impl Guest for Hold {
    fn run(input: String) -> Result<String, String> {
        let (mib, ms) = input
            .split_once(',')
            .and_then(|(a, b)| {
                Some((
                    a.trim().parse::<usize>().ok()?,
                    b.trim().parse::<u64>().ok()?,
                ))
            })
            .ok_or("input must be `MIB,MS`")?;
        let mut held: Vec<Vec<u8>> = Vec::with_capacity(mib);
        for _ in 0..mib {
            held.push(std::hint::black_box(vec![0x5Au8; 1 << 20]));
        }
        let until = Instant::now() + Duration::from_millis(ms);
        // Busy, not sleeping: the memory stays charged while guest code runs.
        while Instant::now() < until {
            std::hint::black_box(&held);
        }
        Ok(format!("held {mib} MiB for {ms} ms"))
    }
}

export!(Hold);
