//! Admission of uploads: what the node accepts to compile and run at all.
//! Every refusal names what is wrong, since the uploader reads it.

use super::AdmissionError;
use super::bindings::AgentPre;
use super::run::RunState;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::wasmparser::Parser;
use wasmtime::{Engine, Trap};

/// The imports of this world a component may use, besides WASI 0.2.
const AGENT_INTERFACES: [&str; 3] = [
    "agentplane:agent/context@0.1.0",
    "agentplane:agent/state@0.1.0",
    "agentplane:agent/log@0.1.0",
];

/// Whether `name` is an interface of WASI 0.2.x (`wasi:<pkg>/<iface>@0.2.<n>`).
fn is_wasi_p2(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("wasi:") else {
        return false;
    };
    let Some((path, version)) = rest.split_once('@') else {
        return false;
    };
    let Some(patch) = version.strip_prefix("0.2.") else {
        return false;
    };
    path.contains('/')
        && !patch.is_empty()
        && patch
            .split(['-', '+'])
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Cheap checks on raw bytes, before any compilation; `max_bytes` is the
/// node's configured bound (`HostConfig::max_component_bytes`).
pub(crate) fn check_bytes(bytes: &[u8], max_bytes: usize) -> Result<(), AdmissionError> {
    let invalid = |m: String| Err(AdmissionError::Invalid(m));
    if bytes.is_empty() {
        return invalid("the upload is empty; expected a WebAssembly component".into());
    }
    if bytes.len() > max_bytes {
        return invalid(format!(
            "the component is {} bytes; at most {max_bytes} bytes are accepted",
            bytes.len()
        ));
    }
    if Parser::is_core_wasm(bytes) {
        return invalid(
            "this is a core WebAssembly module, not a component; build for `wasm32-wasip2` \
             (or wrap it with `wasm-tools component new`)"
                .into(),
        );
    }
    if !Parser::is_component(bytes) {
        return invalid(
            "not a WebAssembly component: the bytes do not start with the component header".into(),
        );
    }
    Ok(())
}

/// Checks a compiled component's imports and exports against the world and
/// prepares it for instantiation.
pub(crate) fn check_component(
    engine: &Engine,
    linker: &Linker<RunState>,
    component: &Component,
) -> Result<AgentPre<RunState>, AdmissionError> {
    let invalid = |m: String| AdmissionError::Invalid(m);
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        if !is_wasi_p2(name) && !AGENT_INTERFACES.contains(&name) {
            return Err(invalid(format!(
                "component imports `{name}`, which is not WASI 0.2 or agentplane:agent@0.1.0 \
                 (context, state, log)"
            )));
        }
    }
    match ty.get_export(engine, "run").map(|e| e.ty) {
        Some(ComponentItem::ComponentFunc(_)) => {}
        Some(_) => {
            return Err(invalid(
                "component exports `run`, but not as a function; expected \
                 `run: func(input: string) -> result<string, string>`"
                    .into(),
            ));
        }
        None => {
            return Err(invalid(
                "component does not export `run: func(input: string) -> result<string, string>`"
                    .into(),
            ));
        }
    }
    let pre = linker.instantiate_pre(component).map_err(|e| {
        invalid(format!(
            "component's imports do not match what this host provides: {}",
            chain(&e)
        ))
    })?;
    AgentPre::new(pre).map_err(|e| {
        invalid(format!(
            "component's export `run` has the wrong type (expected \
             `func(input: string) -> result<string, string>`): {}",
            chain(&e)
        ))
    })
}

fn chain(e: &wasmtime::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasi_names() {
        assert!(is_wasi_p2("wasi:cli/environment@0.2.0"));
        assert!(is_wasi_p2("wasi:io/streams@0.2.6"));
        assert!(is_wasi_p2("wasi:io/streams@0.2.0-rc-2023-11-10"));
        assert!(!is_wasi_p2("wasi:io/streams@0.3.0"));
        assert!(!is_wasi_p2("wasi:io/streams"));
        assert!(!is_wasi_p2("wasix:io/streams@0.2.0"));
        assert!(!is_wasi_p2("evil:thing/x@0.2.0"));
    }

    #[test]
    fn raw_bytes() {
        assert!(check_bytes(b"", 1 << 20).is_err());
        let m = check_bytes(b"\0asm\x01\0\0\0", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(m.contains("core WebAssembly module"), "{m}");
        let m = check_bytes(b"garbage bytes", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a WebAssembly component"), "{m}");
    }
}
