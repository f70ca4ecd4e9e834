//! Hog: grows its memory 1 MiB at a time without bound, to prove the memory limits stop it.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

struct Hog;

impl Guest for Hog {
    fn run(_input: String) -> Result<String, String> {
        let mut held: Vec<Vec<u8>> = Vec::new();
        loop {
            // Filled with non-zero bytes so every page is really touched.
            held.push(std::hint::black_box(vec![0xA5u8; 1 << 20]));
        }
    }
}

export!(Hog);
