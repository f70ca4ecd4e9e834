//! Compute: hashes a buffer N times (N = input), a CPU-bound load for the fuel benchmarks.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

struct Compute;

impl Guest for Compute {
    fn run(input: String) -> Result<String, String> {
        let rounds: u64 = input
            .trim()
            .parse()
            .map_err(|e| format!("input must be a round count: {e}"))?;
        let mut buf = [0u8; 64];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for r in 0..rounds {
            // FNV-1a over a buffer that changes every round.
            buf[(r % 64) as usize] = h as u8;
            for b in buf {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Ok(format!("{h:016x}"))
    }
}

export!(Compute);
