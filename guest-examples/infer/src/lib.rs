//! Calls the node's models as its input says, and reports every answer:
//! the agent the inference tests and benchmark drive.
//!
//! Input: `{"calls": [CALL, ...], "repeat": 1?}`, each CALL one of
//! - `{"complete": {"model", "prompt" | "messages": [{"role","content"}],
//!   "max_tokens", "temperature"?}}`
//! - `{"embed": {"model", "texts": [...]}}`
//! - `{"models": {}}`, `{"left": {}}` (tokens the job may still spend)
//!
//! Output: one answer per call (all of them, `repeat` times), each
//! `{"ok": ...}` or `{"err": {"kind", "detail"}}` for an error value.

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use agentplane::agent::inference::{
    self, Completion, Error, FinishReason, Message, ModelInfo, Prompt,
};
use serde_json::{Value, json};

struct Infer;

fn err(e: Error) -> Value {
    let (kind, detail) = match e {
        Error::UnknownModel(d) => ("unknown_model", json!(d)),
        Error::NotAllowed(d) => ("not_allowed", json!(d)),
        Error::OverBudget(left) => ("over_budget", json!(left)),
        Error::TooLong(d) => ("too_long", json!(d)),
        Error::Unsupported(d) => ("unsupported", json!(d)),
        Error::Failed(d) => ("failed", json!(d)),
    };
    json!({"err": {"kind": kind, "detail": detail}})
}

fn completion(c: Completion) -> Value {
    let finish = match c.finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    };
    json!({"ok": {"text": c.text, "tokens_in": c.tokens_in, "tokens_out": c.tokens_out,
        "finish": finish}})
}

fn info(m: ModelInfo) -> Value {
    json!({"name": m.name, "context_length": m.context_length, "can_complete": m.can_complete,
        "can_embed": m.can_embed, "dimensions": m.dimensions,
        "credits_per_1k_in": m.credits_per_1k_in, "credits_per_1k_out": m.credits_per_1k_out})
}

fn call(c: &Value) -> Result<Value, String> {
    if let Some(a) = c.get("complete") {
        let model = a["model"].as_str().ok_or("complete needs `model`")?;
        let prompt = match (a["prompt"].as_str(), a["messages"].as_array()) {
            (Some(p), _) => Prompt::Text(p.to_string()),
            (None, Some(ms)) => Prompt::Messages(
                ms.iter()
                    .map(|m| Message {
                        role: m["role"].as_str().unwrap_or("user").to_string(),
                        content: m["content"].as_str().unwrap_or("").to_string(),
                    })
                    .collect(),
            ),
            _ => return Err("complete needs `prompt` or `messages`".into()),
        };
        let max = a["max_tokens"].as_u64().unwrap_or(16).min(u32::MAX as u64) as u32;
        let temperature = a["temperature"].as_f64().unwrap_or(0.0) as f32;
        return Ok(
            match inference::complete(model, &prompt, max, temperature) {
                Ok(c) => completion(c),
                Err(e) => err(e),
            },
        );
    }
    if let Some(a) = c.get("embed") {
        let model = a["model"].as_str().ok_or("embed needs `model`")?;
        let texts: Vec<String> = a["texts"]
            .as_array()
            .ok_or("embed needs `texts`")?
            .iter()
            .map(|t| t.as_str().unwrap_or("").to_string())
            .collect();
        return Ok(match inference::embed(model, &texts) {
            Ok(vs) => {
                let dims = vs.first().map_or(0, Vec::len);
                let norms: Vec<f32> = vs
                    .iter()
                    .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt())
                    .collect();
                json!({"ok": {"count": vs.len(), "dims": dims, "norms": norms}})
            }
            Err(e) => err(e),
        });
    }
    if c.get("models").is_some() {
        let list: Vec<Value> = inference::models().into_iter().map(info).collect();
        return Ok(json!({"ok": list}));
    }
    if c.get("left").is_some() {
        return Ok(json!({"ok": inference::tokens_left()}));
    }
    Err(format!("unknown call {c}"))
}

impl Guest for Infer {
    fn run(input: String) -> Result<String, String> {
        let req: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let calls = req["calls"].as_array().ok_or("input needs `calls`")?;
        let repeat = req["repeat"].as_u64().unwrap_or(1);
        let mut out = Vec::new();
        for _ in 0..repeat {
            for c in calls {
                out.push(call(c)?);
            }
        }
        Ok(Value::Array(out).to_string())
    }
}

export!(Infer);
