//! Trap: panics (an `unreachable` trap under panic=abort), to prove a guest crash fails only its job.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

struct Trap;

impl Guest for Trap {
    fn run(input: String) -> Result<String, String> {
        panic!("trap guest panics on purpose: {input}");
    }
}

export!(Trap);
