//! Recurse: recurses without bound (input ignored), to prove deep recursion
//! traps on the guest's stack limit instead of overflowing the host.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

struct Recurse;

#[inline(never)]
fn down(n: u64, pad: [u64; 8]) -> u64 {
    // The array and `black_box` keep each frame real and the call not a loop.
    let pad = std::hint::black_box(pad);
    down(n + 1, pad).wrapping_add(pad[(n % 8) as usize])
}

impl Guest for Recurse {
    fn run(_input: String) -> Result<String, String> {
        Ok(down(0, [1; 8]).to_string())
    }
}

export!(Recurse);
