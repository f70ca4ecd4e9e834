//! How client commands answer: the output format (`--output json|table`),
//! the exit status, and a spinner on stderr while they wait.
//!
//! Exit statuses are distinct so scripts can tell failures apart without
//! parsing stderr: 0 done, 1 any other failure (the API refused for
//! another reason, or could not be reached), 2 usage (clap's own), 3 auth
//! (401/403), 4 not found (404), 5 the job itself failed (`--wait`).

use crate::client::{ClientError, ClientResult};
use serde::Serialize;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Exit status of a refusal other than the ones below, or no answer.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of a bad command line (clap uses it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit status of a missing, wrong or insufficient token (401, 403).
pub const EXIT_AUTH: u8 = 3;
/// Exit status when the thing named does not exist (404).
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit status when the waited-for job ended `failed` or `cancelled`.
pub const EXIT_JOB_FAILED: u8 = 5;

/// `--output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Pretty JSON, as the API answers (the default: stable for scripts).
    #[default]
    Json,
    /// Aligned columns for people: a listing's items as rows, anything
    /// else as field/value lines.
    Table,
}

/// The exit status of an API error.
pub fn exit_of(e: &ClientError) -> ExitCode {
    ExitCode::from(match e.status().map(|s| s.as_u16()) {
        Some(401 | 403) => EXIT_AUTH,
        Some(404) => EXIT_NOT_FOUND,
        _ => EXIT_FAILURE,
    })
}

/// Prints an answer in `format`, or the error with its exit status.
pub fn finish<T: Serialize>(format: Format, r: ClientResult<T>) -> anyhow::Result<ExitCode> {
    match r {
        Ok(v) => {
            print(format, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ClientError::Api { .. }) => {
            eprintln!("error: {e}");
            Ok(exit_of(&e))
        }
        // No answer at all (or one of the wrong shape) is not the API's
        // refusal: reported as the command's own failure.
        Err(e) => Err(e.into()),
    }
}

/// Prints `v` in `format` on stdout.
pub fn print<T: Serialize>(format: Format, v: &T) -> anyhow::Result<()> {
    let v = serde_json::to_value(v)?;
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&v)?,
        Format::Table => table(&v),
    };
    println!("{text}");
    Ok(())
}

/// The list a listing answer carries (`jobs`, `tenants`, `entries`,
/// `buckets`, `results`, or the answer itself when it is an array).
fn rows(v: &Value) -> Option<&Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        Value::Object(o) => ["jobs", "tenants", "entries", "buckets", "results"]
            .iter()
            .find_map(|k| o.get(*k).and_then(Value::as_array)),
        _ => None,
    }
}

/// A value flattened to `(path, text)` pairs, nested objects as `a.b`.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.replace('\n', "\\n"))),
        Value::Null => out.push((prefix.to_string(), String::new())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Aligned text: a listing's items as rows under a header (and its
/// `next_cursor` below), anything else as `field  value` lines.
pub fn table(v: &Value) -> String {
    let Some(items) = rows(v) else {
        let mut pairs = Vec::new();
        flatten("", v, &mut pairs);
        let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        return pairs
            .iter()
            .map(|(k, v)| format!("{k:w$}  {v}"))
            .collect::<Vec<_>>()
            .join("\n");
    };
    // Columns: every field any row has, in first-seen order.
    let flat: Vec<Vec<(String, String)>> = items
        .iter()
        .map(|i| {
            let mut p = Vec::new();
            flatten("", i, &mut p);
            p
        })
        .collect();
    let mut cols: Vec<String> = Vec::new();
    for (k, _) in flat.iter().flatten() {
        if !cols.contains(k) {
            cols.push(k.clone());
        }
    }
    // Fields come sorted by name; the id reads best first.
    if let Some(i) = cols.iter().position(|c| c == "id") {
        let id = cols.remove(i);
        cols.insert(0, id);
    }
    let cells: Vec<Vec<String>> = flat
        .iter()
        .map(|row| {
            cols.iter()
                .map(|c| {
                    row.iter()
                        .find(|(k, _)| k == c)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        r.iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(&cols)];
    out.extend(cells.iter().map(|r| line(r)));
    if let Some(c) = v.get("next_cursor").and_then(Value::as_str) {
        out.push(format!("next_cursor  {c}"));
    }
    out.join("\n")
}

/// A spinner with a message on stderr, drawn only when stderr is a
/// terminal (never into a pipe or a log); cleared when dropped.
pub struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    /// Starts spinning with `msg`, or does nothing off a terminal.
    pub fn start(msg: impl Into<String>) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let (stop, msg) = (stop.clone(), msg.into());
            std::thread::spawn(move || {
                let frames = ['|', '/', '-', '\\'];
                let started = std::time::Instant::now();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r{} {msg} ({}s)",
                        frames[i % frames.len()],
                        started.elapsed().as_secs()
                    );
                    let _ = err.flush();
                    drop(err);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(120));
                }
                // Erase the line so what follows starts clean.
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            })
        });
        Spinner { stop, thread }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables() {
        let v = json!({"jobs": [{"id": "a", "usage": {"fuel": 1}}, {"id": "bb", "error": {"kind": "trap"}}], "next_cursor": "x"});
        assert_eq!(
            table(&v),
            "id  usage.fuel  error.kind\na   1\nbb              trap\nnext_cursor  x"
        );
        assert_eq!(
            table(&json!({"id": "t", "credits": {"balance": 5}})),
            "credits.balance  5\nid               t"
        );
    }
}
