//! RAG question answering: keyword-searches a mounted index and lists the mounted tools.
//!
//! Input: `{"question": "...", "index": "name"?, "k": 3?}`; without `index` it
//! asks for index `""`, which the host answers from the first mounted context.
//! Output:
//! `{"answer": "...", "hits": [{"id","score","text"}], "tools": ["name", ...]}`.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::context::{search_text, tools};
use agentplane::agent::log::{Level, write};
use serde_json::{Value, json};

struct RagQa;

impl Guest for RagQa {
    fn run(input: String) -> Result<String, String> {
        let req: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let question = req["question"]
            .as_str()
            .ok_or("input needs a string `question`")?;
        let index = req["index"].as_str().unwrap_or("");
        let k = req["k"].as_u64().unwrap_or(3).min(100) as u32;
        let hits = search_text(index, question, k)?;
        write(
            Level::Info,
            &format!("{} hits in `{index}` for {question:?}", hits.len()),
        );
        let answer = hits
            .first()
            .map(|h| h.text.clone())
            .unwrap_or_else(|| "I don't know.".to_string());
        let hits: Vec<Value> = hits
            .iter()
            .map(|h| json!({"id": h.id, "score": h.score, "text": h.text}))
            .collect();
        let tools: Vec<String> = tools().into_iter().map(|t| t.name).collect();
        Ok(json!({"answer": answer, "hits": hits, "tools": tools}).to_string())
    }
}

export!(RagQa);
