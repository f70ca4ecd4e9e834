//! Searchk: searches the first mounted context with `k = u32::MAX`, TIMES
//! times (input `TIMES`), by text and, if it has embeddings of dimension
//! DIM, by vector (input `TIMES,DIM`). Reports how many hits came back.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::context;

struct Searchk;

impl Guest for Searchk {
    fn run(input: String) -> Result<String, String> {
        let mut parts = input.split(',');
        let times: u64 = parts
            .next()
            .and_then(|p| p.trim().parse().ok())
            .ok_or("input must be `TIMES[,DIM]`")?;
        let dim: usize = parts
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        let mut hits = 0usize;
        for i in 0..times {
            hits += context::search_text("", "the a of and to in", u32::MAX)?.len();
            if dim > 0 {
                let q: Vec<f32> = (0..dim)
                    .map(|j| ((i as usize + j) % 7) as f32 + 1.0)
                    .collect();
                hits += context::search("", &q, u32::MAX)?.len();
            }
        }
        Ok(format!("{hits} hits"))
    }
}

export!(Searchk);
