//! The node's wasmtime engine: what every instance is compiled and run under,
//! and the epoch ticker that gives wall-clock deadlines and cancellation.

use super::config::HostConfig;
use std::time::Duration;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// One epoch tick. Deadlines and cancellation are checked once per tick, so
/// this bounds how long a cancelled or overdue guest keeps burning CPU (the
/// worker relies on a stop within ~100 ms). Shorter ticks cost a little more
/// in wakeups of the ticker thread; wasm code only pays a load per loop edge.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Stack a guest may use. Deep recursion traps ("call stack exhausted")
/// instead of overflowing the host's fiber stack.
const MAX_WASM_STACK: usize = 1 << 20;

/// Fiber stack per running instance (must exceed `MAX_WASM_STACK` plus what
/// host functions use while the guest is suspended in them).
const ASYNC_STACK: usize = 2 << 20;

/// One slot's share of the instance pool: what a single component may
/// contain at most, and what the pool holds per instance slot. The pool is
/// sized at `max_instances` × this share, so `max_instances` components can
/// always be instantiated at once, whatever they declare: a component may
/// not take its neighbours' share (one declaring 64 core instances, 8
/// memories and 32 tables used to exhaust a node's pool, and every other
/// tenant's job then failed). Admission uses the same engine configuration
/// ([`build`]), so a component over the share is refused at upload.
///
/// Rust agents need 3 core instances, 1 memory and 1-2 tables; the
/// componentize-py Python agent, the largest we know of, 14 modules
/// instantiated ~20 times, 2 memories and a few tables.
pub(crate) const CORE_INSTANCES_PER_SLOT: u32 = 32;
/// Linear memories per component (each pool slot reserves address space).
pub(crate) const MEMORIES_PER_SLOT: u32 = 2;
/// Tables per component.
pub(crate) const TABLES_PER_SLOT: u32 = 8;

/// Metadata (VMContext) bytes a component instance may need in the pool.
/// Components with more lifted/lowered functions than this allows fail to
/// instantiate instead of growing host memory.
const MAX_COMPONENT_INSTANCE_SIZE: usize = 4 << 20;
const MAX_CORE_INSTANCE_SIZE: usize = 1 << 20;

/// Address space the pool's linear memories may reserve at the default
/// layout. By default each memory reserves 4 GiB plus a guard, so compiled
/// code needs no bounds checks; a node with many slots (10,000 slots hold
/// 20,000 memories: over 80 TiB) would pass the 128 TiB of x86-64 user
/// space and could not start. Past this budget the engine is built
/// [`compact`]: each memory reserves only what it may ever grow to.
const POOL_ADDRESS_SPACE: u64 = 16 << 40;

/// What one memory reserves at the default layout (4 GiB and a 32 MiB guard).
const DEFAULT_MEMORY_SLOT: u64 = (4 << 30) + (32 << 20);

/// Whether the engine for `max_instances` slots is built compact: each
/// linear memory reserves `max_memory_per_instance` and a 64 KiB guard,
/// and the compiled code checks bounds explicitly (a few percent slower on
/// memory-heavy guests). Compiled artifacts differ between the layouts, so
/// the compiler process is told which to build for (`compile.rs`), and the
/// disk cache is per engine (its compatibility hash).
pub(crate) fn compact(cfg: &HostConfig) -> bool {
    cfg.pooling
        && u64::from(cfg.max_instances.max(1)) * u64::from(MEMORIES_PER_SLOT) * DEFAULT_MEMORY_SLOT
            > POOL_ADDRESS_SPACE
}

/// Builds the engine for `cfg`, compact or not as [`compact`] says for it.
pub(crate) fn build(cfg: &HostConfig) -> anyhow::Result<Engine> {
    build_as(cfg, compact(cfg))
}

/// Builds the engine for `cfg` with the memory layout named by `compact`.
pub(crate) fn build_as(cfg: &HostConfig, compact: bool) -> anyhow::Result<Engine> {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .consume_fuel(cfg.fuel)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK)
        // Instances start from a copy-on-write mapping of the compiled
        // image instead of copying data segments on every instantiation.
        .memory_init_cow(true)
        .parallel_compilation(true);
    if compact {
        // Whole wasm pages: what an instance may grow to, and no more.
        let reserve = cfg.max_memory_per_instance.div_ceil(1 << 16) << 16;
        c.memory_reservation(reserve)
            .memory_reservation_for_growth(0)
            .memory_guard_size(64 << 10);
    }
    if cfg.pooling {
        let per_instance = usize::try_from(cfg.max_memory_per_instance)?;
        let n = cfg.max_instances.max(1);
        let mut p = PoolingAllocationConfig::default();
        p.total_component_instances(n)
            .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_SLOT))
            .total_memories(n.saturating_mul(MEMORIES_PER_SLOT))
            .total_tables(n.saturating_mul(TABLES_PER_SLOT))
            .total_stacks(n)
            .max_core_instances_per_component(CORE_INSTANCES_PER_SLOT)
            .max_memories_per_component(MEMORIES_PER_SLOT)
            .max_tables_per_component(TABLES_PER_SLOT)
            .max_component_instance_size(MAX_COMPONENT_INSTANCE_SIZE)
            .max_core_instance_size(MAX_CORE_INSTANCE_SIZE)
            .max_memory_size(per_instance)
            // Freed slots are returned to the kernel: a burst of hogs must not
            // leave the node's RSS at its peak.
            .linear_memory_keep_resident(0)
            .table_keep_resident(0);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    } else {
        c.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    }
    Engine::new(&c).map_err(anyhow::Error::from)
}

/// Memory mappings a live instance may take (its memory's image and
/// accessible part, its stack and guard, its tables): measured about 7 on
/// Linux, with room.
const MAPS_PER_INSTANCE: u64 = 8;

/// Warns when the kernel's `vm.max_map_count` is too low for every slot to
/// hold a live instance: past it, instantiations fail with ENOMEM (a node
/// fault, requeued uncharged), so a dense node (thousands of slots) should
/// raise it, as the README says.
pub(crate) fn check_map_count(cfg: &HostConfig) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/vm/max_map_count") else {
        return;
    };
    let need = u64::from(cfg.max_instances) * MAPS_PER_INSTANCE + 10_000;
    if let Ok(have) = text.trim().parse::<u64>()
        && have < need
    {
        tracing::warn!(
            slots = cfg.max_instances,
            max_map_count = have,
            "vm.max_map_count is too low for every slot to run at once: raise it to at least {need} (sysctl -w vm.max_map_count={need})"
        );
    }
}

/// Starts the thread that advances the engine's epoch every [`EPOCH_TICK`].
/// It holds only a weak handle, so it ends by itself once the last `Engine`
/// clone (the `Host`) is dropped instead of keeping the engine alive forever.
pub(crate) fn start_ticker(engine: &Engine) -> anyhow::Result<()> {
    let weak = engine.weak();
    spawn_periodic(
        "agentplane-epoch",
        EPOCH_TICK,
        move || weak.upgrade(),
        |engine| engine.increment_epoch(),
    )?;
    Ok(())
}

/// Starts a named thread that, every `every`, upgrades a weak handle
/// (`upgrade`) and calls `tick` on what it holds; it ends once the handle's
/// owner is gone, so it never keeps the host alive. The host's background
/// threads (epoch ticker, warm-instance sweeper) are this.
pub(crate) fn spawn_periodic<T>(
    name: &str,
    every: Duration,
    upgrade: impl Fn() -> Option<T> + Send + 'static,
    tick: impl Fn(T) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                match upgrade() {
                    Some(owner) => tick(owner),
                    None => break,
                }
            }
        })?;
    Ok(())
}

/// Number of epoch ticks covering `d`, rounded up and at least one, so a
/// deadline is never earlier than asked.
pub(crate) fn ticks_for(d: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (d.as_nanos().div_ceil(tick)).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks_for(Duration::ZERO), 1);
        assert_eq!(ticks_for(EPOCH_TICK), 1);
        assert_eq!(ticks_for(EPOCH_TICK + Duration::from_nanos(1)), 2);
        assert_eq!(ticks_for(EPOCH_TICK * 10), 10);
    }
}
