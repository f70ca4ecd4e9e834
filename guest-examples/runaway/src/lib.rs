//! Runaway: loops forever, to prove fuel, epoch deadlines and cancellation stop it.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

struct Runaway;

impl Guest for Runaway {
    fn run(_input: String) -> Result<String, String> {
        let mut n: u64 = 0;
        loop {
            // `black_box` keeps the optimiser from proving anything about the loop.
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export!(Runaway);
