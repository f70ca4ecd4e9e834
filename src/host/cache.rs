//! Compiled components: compiled once per node, kept pre-instantiated in an
//! LRU under a byte budget, and precompiled to disk so a restarted node (or
//! a second host on the same disk) skips compilation.

use super::admission;
use super::bindings::AgentPre;
use super::run::RunState;
use super::{AdmissionError, HostConfig, HostError, LoadedComponent};
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

/// `sha256:<hex>` of `bytes`.
pub(crate) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a well-formed digest. Digests become file names: anything
/// but 64 lowercase hex digits could walk out of the cache directory.
fn digest_hex(digest: &str) -> Option<&str> {
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
    fn load_precompiled(&self, digest: &str, hex: &str) -> Option<LoadedComponent> {
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
    fn compile(&self, digest: &str, bytes: &[u8]) -> Result<LoadedComponent, HostError> {
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
        admission::check_bytes(bytes, self.cfg.max_component_bytes)?;
        super::structure::check(bytes)?;
        let component = match &self.cfg.compile_child {
            Some(child) => super::compile::compile(child, &self.cfg, &self.engine, bytes)?,
            None => {
                Component::new(&self.engine, bytes).map_err(|e| admission::compile_error(&e))?
            }
        };
        let pre = admission::check_component(&self.engine, &self.linker, &component)?;
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
        let pre: AgentPre<RunState> =
            admission::check_component(&self.engine, &self.linker, &component)
                .map_err(|e| anyhow::anyhow!("{digest}: {e}"))?;
        Ok(LoadedComponent {
            digest: digest.to_string(),
            pre,
            size: in_memory_size(&component, upload_size),
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

/// In-memory cache with single-flight loading.
pub(crate) struct ComponentCache {
    budget: u64,
    lru: Mutex<Lru>,
    inflight: Mutex<HashMap<String, Arc<OnceCell<Arc<LoadedComponent>>>>>,
    /// Digests that failed to compile, with the reason: a bad component is
    /// refused at once on every later claim instead of being fetched and
    /// recompiled (a job of it used to cycle release-and-recompile at 100%
    /// CPU). Bounded: the oldest reasons are forgotten first.
    failed: Mutex<LruCache<String, String>>,
}

/// Failed digests remembered per node.
const FAILED_REMEMBERED: usize = 1024;

struct Lru {
    map: LruCache<String, Arc<LoadedComponent>>,
    bytes: u64,
}

impl ComponentCache {
    pub fn new(budget: u64) -> Self {
        ComponentCache {
            budget,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(FAILED_REMEMBERED)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    fn cached(&self, digest: &str) -> Option<Arc<LoadedComponent>> {
        self.lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(digest)
            .cloned()
    }

    /// Keeps `c`, evicting the least recently used beyond the budget.
    pub fn insert(&self, c: Arc<LoadedComponent>) {
        let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = lru.map.put(c.digest.clone(), c.clone()) {
            lru.bytes -= old.size as u64;
        }
        lru.bytes += c.size as u64;
        // Evict least recently used, but always keep the newest one: a
        // component larger than the budget must still run.
        while lru.bytes > self.budget && lru.map.len() > 1 {
            match lru.map.pop_lru() {
                Some((_, old)) => lru.bytes -= old.size as u64,
                None => break,
            }
        }
    }

    /// The component of `digest`: from memory, else from disk, else fetched
    /// and compiled. Concurrent callers for one digest share one load.
    pub async fn get<F, Fut>(
        &self,
        compiler: &Arc<Compiler>,
        digest: &str,
        fetch: F,
    ) -> Result<Arc<LoadedComponent>, HostError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<Vec<u8>>>>,
    {
        if let Some(c) = self.cached(digest) {
            return Ok(c);
        }
        if let Some(why) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Err(HostError::Invalid(why.clone()));
        }
        let hex = digest_hex(digest)
            .ok_or_else(|| HostError::NotFound(digest.to_string()))?
            .to_string();
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.to_string())
            .or_default()
            .clone();
        let result = cell
            .get_or_try_init(|| async {
                // Checked again: a load may have finished between our miss
                // and taking the cell.
                if let Some(c) = self.cached(digest) {
                    return Ok(c);
                }
                let c = self.load(compiler, digest, &hex, fetch).await?;
                let c = Arc::new(c);
                self.insert(c.clone());
                Ok::<_, HostError>(c)
            })
            .await
            .cloned();
        if let Err(HostError::Invalid(why)) = &result {
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(digest.to_string(), why.clone());
        }
        // Success or failure, the next miss starts afresh.
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if inflight.get(digest).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(digest);
        }
        result
    }

    async fn load<F, Fut>(
        &self,
        compiler: &Arc<Compiler>,
        digest: &str,
        hex: &str,
        fetch: F,
    ) -> Result<LoadedComponent, HostError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<Vec<u8>>>>,
    {
        // Deserializing and compiling are CPU-bound: off the async threads.
        let (c, d, h) = (compiler.clone(), digest.to_string(), hex.to_string());
        let from_disk = tokio::task::spawn_blocking(move || c.load_precompiled(&d, &h))
            .await
            .map_err(|e| anyhow::anyhow!("loading {digest} from disk: {e}"))?;
        if let Some(loaded) = from_disk {
            return Ok(loaded);
        }
        let bytes = fetch()
            .await?
            .ok_or_else(|| HostError::NotFound(digest.to_string()))?;
        if digest_of(&bytes) != digest {
            // The store answered with other bytes than asked for: never run
            // them under this name.
            return Err(anyhow::anyhow!("fetched bytes do not match {digest}").into());
        }
        let (c, d) = (compiler.clone(), digest.to_string());
        tokio::task::spawn_blocking(move || c.compile(&d, &bytes))
            .await
            .map_err(|e| anyhow::anyhow!("compiling {digest}: {e}"))?
    }
}
