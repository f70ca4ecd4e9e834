//! Echo: returns its input, or `Err(rest)` for input `fail:<rest>`; logs once and prints once.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::log::{Level, write};

struct Echo;

impl Guest for Echo {
    fn run(input: String) -> Result<String, String> {
        write(Level::Info, &format!("echo got {} bytes", input.len()));
        println!("echo stdout: {input}");
        match input.strip_prefix("fail:") {
            Some(rest) => Err(rest.to_string()),
            None => Ok(input),
        }
    }
}

export!(Echo);
