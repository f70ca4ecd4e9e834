//! Compilation in a child process, bounded in time and memory.
//!
//! Cranelift cannot be interrupted, and its time and memory grow
//! superlinearly in some shapes of code: compiled in-process, one hostile
//! upload held an API thread and ~100 CPU-seconds, and a larger one could
//! take hours. The structural checks (`structure`) refuse the known shapes
//! cheaply; this bounds whatever they miss. The parent hands the bytes to
//! `<exe> __compile-child ...` on stdin and reads the serialized artifact
//! from stdout; the child runs under `RLIMIT_CPU` and `RLIMIT_DATA`, and
//! the parent kills it at the wall-clock bound.

use super::config::{AdmissionError, CompileChild, HostConfig};
use super::engine;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wasmtime::Trap;
use wasmtime::component::Component;

/// The argument that makes the `agentplane` binary a compile child.
pub const CHILD_ARG: &str = "__compile-child";

/// Longest error text read back from a child.
const MAX_ERROR_TEXT: u64 = 16 << 10;

/// Compiles `bytes` in a child process under `child`'s bounds, with the
/// engine configuration of `cfg`. `Invalid` for what the compiler refused
/// or what crossed a bound; `Unavailable` when the child could not be run.
pub(crate) fn compile(
    child: &CompileChild,
    cfg: &HostConfig,
    engine: &wasmtime::Engine,
    bytes: &[u8],
) -> Result<Component, AdmissionError> {
    let unavailable = |what: &str, e: std::io::Error| {
        AdmissionError::Unavailable(format!("compiler process: {what}: {e}"))
    };
    let cpu_secs = child.timeout.as_secs().saturating_mul(2).max(1);
    let mut proc = Command::new(&child.exe)
        .arg(CHILD_ARG)
        .arg(if cfg.fuel { "1" } else { "0" })
        .arg(if cfg.pooling { "1" } else { "0" })
        .arg(cfg.max_memory_per_instance.to_string())
        .arg(if engine::compact(cfg) { "1" } else { "0" })
        .arg(cpu_secs.to_string())
        .arg(child.memory_bytes.to_string())
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| unavailable("spawn", e))?;
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (proc.stdin.take(), proc.stdout.take(), proc.stderr.take())
    else {
        let _ = proc.kill();
        let _ = proc.wait();
        return Err(AdmissionError::Unavailable(
            "compiler process: no pipes".into(),
        ));
    };
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let errors = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.take(MAX_ERROR_TEXT).read_to_string(&mut err);
        err
    });
    let deadline = Instant::now() + child.timeout;
    let status = loop {
        match proc.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                let _ = proc.kill();
                let _ = proc.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = proc.kill();
                let _ = proc.wait();
                return Err(unavailable("wait", e));
            }
        }
    };
    let _ = writer.join();
    let artifact = reader.join().unwrap_or_default();
    let text = errors.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(AdmissionError::Invalid(format!(
            "compiling the component took longer than {} s; it is refused",
            child.timeout.as_secs()
        )));
    };
    if !status.success() {
        let text = text.trim();
        return Err(AdmissionError::Invalid(if text.is_empty() {
            // Killed by its CPU or memory bound (or crashed).
            format!(
                "compiling the component exceeded the compiler's CPU ({cpu_secs} s) or memory \
                 ({} bytes) bound; it is refused",
                child.memory_bytes
            )
        } else {
            text.to_string()
        }));
    }
    // SAFETY: `deserialize` trusts the bytes to be an artifact wasmtime
    // produced. They come from our own binary's `Component::serialize`,
    // through a pipe only parent and child hold; wasmtime further checks the
    // header and that the artifact matches this engine's configuration.
    unsafe { Component::deserialize(engine, &artifact) }.map_err(|e| {
        AdmissionError::Unavailable(format!("compiler process: unusable artifact: {e}"))
    })
}

/// The child's side: when the process was started as a compile child,
/// compiles stdin to stdout and answers the exit code; `None` otherwise.
/// Call first thing in `main`.
pub fn child_main() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(CHILD_ARG) {
        return None;
    }
    Some(match child(&args[2..]) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(msg) => {
            let _ = writeln!(std::io::stderr(), "{msg}");
            std::process::ExitCode::from(2)
        }
    })
}

fn child(args: &[String]) -> Result<(), String> {
    let num = |i: usize| -> Result<u64, String> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "compiler process: bad arguments".to_string())
    };
    let (fuel, pooling, max_mem, compact, cpu, mem) =
        (num(0)?, num(1)?, num(2)?, num(3)?, num(4)?, num(5)?);
    limit(libc::RLIMIT_CPU, cpu);
    limit(libc::RLIMIT_DATA, mem);
    let cfg = HostConfig {
        max_instances: 1,
        max_memory_per_instance: max_mem,
        fuel: fuel == 1,
        pooling: pooling == 1,
        ..HostConfig::default()
    };
    // The worker's memory layout, whatever the size of this one-slot pool.
    let engine = engine::build_as(&cfg, compact == 1)
        .map_err(|e| format!("compiler process: engine: {e}"))?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("compiler process: reading the component: {e}"))?;
    let component = Component::new(&engine, &bytes).map_err(|e| compile_error(&e).to_string())?;
    let artifact = component
        .serialize()
        .map_err(|e| format!("compiler process: {e}"))?;
    std::io::stdout()
        .write_all(&artifact)
        .map_err(|e| format!("compiler process: writing the artifact: {e}"))
}

fn limit(resource: libc::__rlimit_resource_t, value: u64) {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit on this process with a valid struct.
    unsafe {
        libc::setrlimit(resource, &lim);
    }
}

/// The error and its causes on one line, for the uploader.
pub(crate) fn chain(e: &wasmtime::Error) -> String {
    // A compile error is never a trap, but keep traps' text readable too.
    if let Some(t) = e.downcast_ref::<Trap>() {
        return t.to_string();
    }
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Text of a compilation failure, for the uploader.
pub(crate) fn compile_error(e: &wasmtime::Error) -> AdmissionError {
    AdmissionError::Invalid(format!("invalid component: {}", chain(e)))
}
