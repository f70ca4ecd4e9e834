//! Hold: takes `MIB,MS` as input, holds MIB MiB of memory for MS ms of busy work, then returns.
//!
//! `MIB,MS,stamp` also reports when this run started (wall clock, ms since
//! the Unix epoch), so two runs of the same job give different outputs and
//! a test can tell which run's result was kept.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Hold;

impl Guest for Hold {
    fn run(input: String) -> Result<String, String> {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut fields = input.split(',').map(str::trim);
        let (mib, ms, stamp) = (|| {
            let mib = fields.next()?.parse::<usize>().ok()?;
            let ms = fields.next()?.parse::<u64>().ok()?;
            let stamp = match fields.next() {
                None => false,
                Some("stamp") => true,
                Some(_) => return None,
            };
            fields.next().is_none().then_some((mib, ms, stamp))
        })()
        .ok_or("input must be `MIB,MS` or `MIB,MS,stamp`")?;
        let mut held: Vec<Vec<u8>> = Vec::with_capacity(mib);
        for _ in 0..mib {
            held.push(std::hint::black_box(vec![0x5Au8; 1 << 20]));
        }
        let until = Instant::now() + Duration::from_millis(ms);
        // Busy, not sleeping: the memory stays charged while guest code runs.
        while Instant::now() < until {
            std::hint::black_box(&held);
        }
        if stamp {
            Ok(format!("held {mib} MiB for {ms} ms, started at {started}"))
        } else {
            Ok(format!("held {mib} MiB for {ms} ms"))
        }
    }
}

export!(Hold);
