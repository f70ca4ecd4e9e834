//! RAG question answering with a model: retrieves passages from a mounted
//! context by keyword relevance, then asks one of the node's models to
//! answer from them.
//!
//! Input: `{"question": "...", "model": "name", "index": "name"?, "k": 3?,
//! "max_tokens": 64?}`; without `index` it searches the first mounted
//! context.
//! Output: `{"answer": "...", "sources": ["id", ...], "tokens_in": n,
//! "tokens_out": n}`. An inference error (the tenant may not use the
//! model, the job's tokens are spent) is the job's error, named.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::context::search_text;
use agentplane::agent::inference::{self, Message, Prompt};
use agentplane::agent::log::{Level, write};
use serde_json::{Value, json};

struct RagAsk;

impl Guest for RagAsk {
    fn run(input: String) -> Result<String, String> {
        let req: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let question = req["question"]
            .as_str()
            .ok_or("input needs a string `question`")?;
        let model = req["model"]
            .as_str()
            .ok_or("input needs a string `model`")?;
        let index = req["index"].as_str().unwrap_or("");
        let k = req["k"].as_u64().unwrap_or(3).min(20) as u32;
        let max_tokens = req["max_tokens"].as_u64().unwrap_or(64).min(4096) as u32;

        let hits = search_text(index, question, k)?;
        write(
            Level::Info,
            &format!("{} passages for {question:?}", hits.len()),
        );
        let mut context = String::new();
        for h in &hits {
            context.push_str(&format!("[{}] {}\n", h.id, h.text));
        }
        let prompt = Prompt::Messages(vec![
            Message {
                role: "system".into(),
                content: "Answer the question from the passages only; cite their ids.".into(),
            },
            Message {
                role: "user".into(),
                content: format!("Passages:\n{context}\nQuestion: {question}"),
            },
        ]);
        let answer = inference::complete(model, &prompt, max_tokens, 0.0)
            .map_err(|e| format!("inference: {e:?}"))?;
        let sources: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
        Ok(json!({
            "answer": answer.text,
            "sources": sources,
            "tokens_in": answer.tokens_in,
            "tokens_out": answer.tokens_out,
        })
        .to_string())
    }
}

export!(RagAsk);
