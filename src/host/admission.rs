//! Admission of uploads: what the node accepts to compile and run at all.
//! Every refusal names what is wrong, since the uploader reads it.

use super::bindings::AgentPre;
use super::compile::{self, chain};
use super::config::{AdmissionError, HostConfig, HostError};
use super::state::{LoadedComponent, RunState};
use super::structure;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use wasmtime::Engine;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::wasmparser::Parser;

/// The imports of this world a component may use, besides WASI 0.2: those
/// of 0.1.0, and of 0.1.1, which added `inference` (a 0.1.0 import is
/// served by the 0.1.1 definition: wasmtime links compatible versions).
const AGENT_INTERFACES: [&str; 7] = [
    "agentplane:agent/context@0.1.0",
    "agentplane:agent/state@0.1.0",
    "agentplane:agent/log@0.1.0",
    "agentplane:agent/context@0.1.1",
    "agentplane:agent/state@0.1.1",
    "agentplane:agent/log@0.1.1",
    INFERENCE,
];

/// The interface of the node's models: its components' jobs reserve for
/// tokens.
const INFERENCE: &str = "agentplane:agent/inference@0.1.1";

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
                "component imports `{name}`, which is not WASI 0.2 or agentplane:agent@0.1.1 \
                 (context, state, log, inference)"
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

/// Whether `component` imports an interface whose name starts with
/// `prefix` (`wasi:http/outgoing-handler@`: it can make outgoing requests,
/// so its jobs reserve for them; `wasi:config/store@`: it reads its
/// tenant's secrets).
fn imports(engine: &Engine, component: &Component, prefix: &str) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.starts_with(prefix))
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a well-formed digest. Digests become file names: anything
/// but 64 lowercase hex digits could walk out of the cache directory.
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// Compiles and prepares components; shared with the blocking pool.
pub(crate) struct Compiler {
    pub engine: Engine,
    pub linker: Linker<RunState>,
    /// What the compile child needs to build the same engine.
    cfg: HostConfig,
    /// `<cache_dir>/<engine compatibility hash>`: artifacts of another
    /// wasmtime version or configuration never get mixed in.
    disk: Option<PathBuf>,
    pub compiles: AtomicU64,
    pub disk_loads: AtomicU64,
}

impl Compiler {
    pub fn new(engine: Engine, linker: Linker<RunState>, cfg: &HostConfig) -> anyhow::Result<Self> {
        let disk = match cfg.cache_dir.as_deref() {
            None => None,
            Some(dir) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                engine.precompile_compatibility_hash().hash(&mut h);
                let dir = dir.join(format!("wasmtime-{:016x}", h.finish()));
                std::fs::create_dir_all(&dir)?;
                Some(dir)
            }
        };
        Ok(Compiler {
            engine,
            linker,
            cfg: cfg.clone(),
            disk,
            compiles: AtomicU64::new(0),
            disk_loads: AtomicU64::new(0),
        })
    }

    fn disk_path(&self, hex: &str) -> Option<PathBuf> {
        self.disk.as_ref().map(|d| d.join(format!("{hex}.cwasm")))
    }

    /// The precompiled artifact of `digest` from disk, if there is a usable one.
    pub(crate) fn load_precompiled(&self, digest: &str, hex: &str) -> Option<LoadedComponent> {
        let path = self.disk_path(hex)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: `deserialize_file` trusts the file to be an artifact that
        // wasmtime produced; a crafted one could run arbitrary native code.
        // Only this module writes into `self.disk` (a directory private to
        // the node's cache, named after this engine's compatibility hash),
        // always from `Component::serialize` of our own compilation, and
        // renames it into place only once fully written; wasmtime further
        // checks the header and engine compatibility on load.
        let loaded = unsafe { Component::deserialize_file(&self.engine, &path) };
        match loaded
            .map_err(|e| admission_text(&e))
            .and_then(|c| self.prepare(digest, c, 0).map_err(|e| e.to_string()))
        {
            Ok(l) => {
                self.disk_loads.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("agentplane_host_component_disk_loads_total").increment(1);
                Some(l)
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "discarding unusable precompiled component");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Compiles `bytes` (already checked to hash to `digest`).
    pub(crate) fn compile(&self, digest: &str, bytes: &[u8]) -> Result<LoadedComponent, HostError> {
        // Refused by the checks or the compiler: the same bytes under the
        // same engine configuration will never do better.
        self.compile_checked(bytes).map_err(|e| match e {
            AdmissionError::Invalid(why) => HostError::Invalid(format!("{digest}: {why}")),
            AdmissionError::Unavailable(why) => anyhow::anyhow!("{digest}: {why}").into(),
        })
    }

    /// Checks and compiles an upload as admission does, then writes the
    /// artifact to disk so that no node on this disk compiles it again.
    pub fn compile_checked(&self, bytes: &[u8]) -> Result<LoadedComponent, AdmissionError> {
        check_bytes(bytes, self.cfg.max_component_bytes)?;
        structure::check(bytes)?;
        let component = match &self.cfg.compile_child {
            Some(child) => compile::compile(child, &self.cfg, &self.engine, bytes)?,
            None => Component::new(&self.engine, bytes).map_err(|e| compile::compile_error(&e))?,
        };
        let pre = check_component(&self.engine, &self.linker, &component)?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("agentplane_host_component_compiles_total").increment(1);
        let digest = digest_of(bytes);
        let hex = digest_hex(&digest).unwrap_or_default();
        if let Some(path) = self.disk_path(hex) {
            // A failed write only costs a compile next time.
            if let Err(e) = write_atomically(&path, &component) {
                tracing::warn!(%digest, error = %e, "could not write precompiled component");
            }
        }
        Ok(LoadedComponent {
            size: in_memory_size(&component, bytes.len()),
            outbound_http: imports(&self.engine, &component, "wasi:http/outgoing-handler@"),
            reads_config: imports(&self.engine, &component, "wasi:config/store@"),
            inference: imports(&self.engine, &component, INFERENCE),
            digest,
            pre,
        })
    }

    fn prepare(
        &self,
        digest: &str,
        component: Component,
        upload_size: usize,
    ) -> Result<LoadedComponent, HostError> {
        let pre: AgentPre<RunState> = check_component(&self.engine, &self.linker, &component)
            .map_err(|e| anyhow::anyhow!("{digest}: {e}"))?;
        Ok(LoadedComponent {
            digest: digest.to_string(),
            pre,
            size: in_memory_size(&component, upload_size),
            outbound_http: imports(&self.engine, &component, "wasi:http/outgoing-handler@"),
            reads_config: imports(&self.engine, &component, "wasi:config/store@"),
            inference: imports(&self.engine, &component, INFERENCE),
        })
    }
}

/// What the LRU budget counts for a component: its mapped code image, or
/// the upload's size if that is larger (metadata grows with it).
fn in_memory_size(component: &Component, upload_size: usize) -> usize {
    let image = component.image_range();
    (image.end as usize - image.start as usize).max(upload_size)
}

fn admission_text(e: &wasmtime::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn write_atomically(path: &Path, component: &Component) -> anyhow::Result<()> {
    let bytes = component.serialize()?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    // Rename is atomic: a reader sees no file or a whole one, never a torn one.
    std::fs::rename(&tmp, path)?;
    Ok(())
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
