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

/// Builds the engine for `cfg`.
pub(crate) fn build(cfg: &HostConfig) -> anyhow::Result<Engine> {
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

/// Starts the thread that advances the engine's epoch every [`EPOCH_TICK`].
/// It holds only a weak handle, so it ends by itself once the last `Engine`
/// clone (the `Host`) is dropped instead of keeping the engine alive forever.
pub(crate) fn start_ticker(engine: &Engine) -> anyhow::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("agentplane-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
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
