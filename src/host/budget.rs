//! Per-run memory budgets: one instance's own cap and its tenant's share of
//! the node, both enforced when linear memory is created or grown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Table elements one store may hold. A table element costs the host a
/// pointer or two; without a cap, `table.grow` is a way around the memory
/// limit.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Why a run was stopped from the outside, recorded where the stop happened
/// so the outcome can be classified exactly afterwards.
#[derive(Debug, Default)]
pub(crate) struct RunFlags {
    /// The memory limiter refused (or the allocator failed) a growth.
    pub memory_denied: AtomicBool,
    /// The epoch callback saw the wall-clock deadline pass.
    pub timed_out: AtomicBool,
    /// The epoch callback saw the cancellation token.
    pub cancelled: AtomicBool,
    /// A host function failed for a reason of the host's own (a search task
    /// that panicked): the run stops as `node_fault`, not as the guest's trap.
    pub host_fault: AtomicBool,
}

/// Frees memory the tenant holds without running anything (its idle warm
/// instances); answers whether it freed any.
pub(crate) type Reclaim = Box<dyn Fn() -> bool + Send + Sync>;

/// Memory held by the live instances of one tenant on this node, idle warm
/// ones included.
pub(crate) struct TenantBudget {
    pub used: AtomicU64,
    pub limit: u64,
    /// Called when a charge does not fit, before it is refused: an idle
    /// instance must never cost its tenant a job that would otherwise fit.
    reclaim: Option<Reclaim>,
    /// The tenant's outgoing HTTP requests in flight on this node
    /// (`EgressLimits::max_in_flight_per_tenant` places).
    pub egress: Arc<tokio::sync::Semaphore>,
}

impl TenantBudget {
    pub fn new(limit: u64) -> Self {
        TenantBudget {
            used: AtomicU64::new(0),
            limit,
            reclaim: None,
            egress: Arc::new(tokio::sync::Semaphore::new(
                super::limits::EGRESS_MAX_IN_FLIGHT_PER_TENANT as usize,
            )),
        }
    }

    /// The same budget with `n` places for outgoing requests in flight.
    pub fn with_egress_in_flight(mut self, n: u32) -> Self {
        self.egress = Arc::new(tokio::sync::Semaphore::new(n as usize));
        self
    }

    /// A budget that calls `reclaim` when a charge does not fit, then tries
    /// once more.
    pub fn with_reclaim(limit: u64, reclaim: Reclaim) -> Self {
        TenantBudget {
            reclaim: Some(reclaim),
            ..TenantBudget::new(limit)
        }
    }

    /// Takes `bytes` from the budget, or nothing if that would exceed it
    /// even after reclaiming what the tenant's idle instances hold.
    fn try_charge(&self, bytes: u64) -> bool {
        self.charge_now(bytes)
            || (self.reclaim.as_ref().is_some_and(|r| r()) && self.charge_now(bytes))
    }

    fn charge_now(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        // Never below zero, whatever the bookkeeping: a wrapped counter would
        // lock the tenant out of the node for good.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }
}

/// Bytes charged to a tenant's node budget for something the host holds
/// on its behalf outside any instance (a model call's key/value cache),
/// given back when dropped, however the holder ends.
pub(crate) struct Held {
    tenant: Arc<TenantBudget>,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.tenant.release(self.bytes);
    }
}

impl RunFlags {
    /// Whether anything stopped the run or was refused to it.
    pub fn any(&self) -> bool {
        [
            &self.memory_denied,
            &self.timed_out,
            &self.cancelled,
            &self.host_fault,
        ]
        .iter()
        .any(|f| f.load(Ordering::Acquire))
    }
}

/// The `ResourceLimiter` of one store. Whatever it grants is charged to the
/// tenant's budget and given back when the store (and so this) is dropped.
pub(crate) struct MemoryLimiter {
    /// Bytes all memories of this instance may hold together.
    instance_limit: u64,
    /// Bytes this instance holds now (all its memories).
    used: u64,
    /// Bytes charged to the tenant and not yet released.
    charged: u64,
    /// The last growth granted, refunded if the allocation then failed.
    pending: u64,
    /// Bytes of a host call's answer charged to the tenant while the host
    /// holds them (see [`MemoryLimiter::reserve_answer`]).
    answer: u64,
    /// Bytes of the `state.set` value the host keeps for the run, charged
    /// to the tenant (see [`MemoryLimiter::keep_state`]).
    kept: u64,
    tenant: Arc<TenantBudget>,
    flags: Arc<RunFlags>,
}

impl MemoryLimiter {
    pub fn new(instance_limit: u64, tenant: Arc<TenantBudget>, flags: Arc<RunFlags>) -> Self {
        MemoryLimiter {
            instance_limit,
            used: 0,
            charged: 0,
            pending: 0,
            answer: 0,
            kept: 0,
            tenant,
            flags,
        }
    }

    /// Charges `bytes` a host call built for the guest (hits, tools, a state
    /// read, random bytes) to the tenant's budget, if they fit under it and
    /// the instance's limit leaves room to take them. The host holds such an
    /// answer outside every linear memory until it is copied in: unpaid,
    /// every instance of a tenant could make the node hold one answer (up to
    /// 16 MiB) beyond the tenant's budget. Held until
    /// [`MemoryLimiter::release_answer`] (the guest's next host call) or
    /// the end of the run; the copy into guest memory is charged on top,
    /// as both exist while it is made.
    pub fn reserve_answer(&mut self, bytes: u64) -> bool {
        if self.used.saturating_add(bytes) > self.instance_limit || !self.tenant.try_charge(bytes) {
            return false;
        }
        self.answer += bytes;
        true
    }

    /// Charges the `bytes` of a `state.set` value to the tenant's budget in
    /// place of the value it replaces, if they fit. The host keeps the value
    /// outside every linear memory until the run ends (it is committed only
    /// then): unpaid, every instance of a tenant could make the node keep up
    /// to 16 MiB beyond the tenant's budget for as long as it runs.
    pub fn keep_state(&mut self, bytes: u64) -> bool {
        self.tenant.release(std::mem::take(&mut self.kept));
        if !self.tenant.try_charge(bytes) {
            return false;
        }
        self.kept = bytes;
        true
    }

    /// Bytes of linear memory this instance holds, which is also the most it
    /// ever held: wasm memories only grow.
    pub fn linear_bytes(&self) -> u64 {
        self.used
    }

    /// Makes the limiter of a warm instance ready for its next run: what the
    /// last run's host calls held (an answer, a kept state) is given back,
    /// and stops are recorded in `flags`. The linear memory the instance
    /// holds stays charged: it is still there.
    pub fn reuse(&mut self, flags: Arc<RunFlags>) {
        self.release_answer();
        self.tenant.release(std::mem::take(&mut self.kept));
        self.pending = 0;
        self.flags = flags;
    }

    /// Gives back the answer charged by [`MemoryLimiter::reserve_answer`]:
    /// the guest made another host call, so the last answer has been copied
    /// into its memory (or dropped) by now.
    /// Charges `bytes` the host is about to hold for this run outside its
    /// instance to the tenant's node budget, if they fit; they are given
    /// back when the answer is dropped.
    pub fn hold(&self, bytes: u64) -> Option<Held> {
        self.tenant.try_charge(bytes).then(|| Held {
            tenant: self.tenant.clone(),
            bytes,
        })
    }

    pub fn release_answer(&mut self) {
        self.tenant.release(std::mem::take(&mut self.answer));
    }

    fn deny(&self) -> wasmtime::Result<bool> {
        self.flags.memory_denied.store(true, Ordering::Release);
        // `Ok(false)` makes `memory.grow` return -1: the guest sees an
        // allocation failure (Rust aborts, which traps) and the flag turns
        // that trap into `memory_limit`.
        Ok(false)
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            // The module's own declared maximum: wasm semantics, not our limit.
            return Ok(false);
        }
        let delta = desired.saturating_sub(current) as u64;
        if self.used.saturating_add(delta) > self.instance_limit {
            return self.deny();
        }
        if !self.tenant.try_charge(delta) {
            return self.deny();
        }
        self.used += delta;
        self.charged += delta;
        self.pending = delta;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // We granted it but the allocator could not (pool slot smaller than
        // asked, or the OS said no): give the charge back and count it as a
        // memory limit, which is what the guest hit.
        let refund = std::mem::take(&mut self.pending);
        self.used -= refund;
        self.charged -= refund;
        self.tenant.release(refund);
        self.flags.memory_denied.store(true, Ordering::Release);
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        if desired > MAX_TABLE_ELEMENTS {
            return self.deny();
        }
        Ok(true)
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.tenant.release(self.charged + self.answer + self.kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn tenant_budget_is_shared_and_released_on_drop() {
        let tenant = Arc::new(TenantBudget::new(100));
        let mut a = MemoryLimiter::new(80, tenant.clone(), Default::default());
        let mut b = MemoryLimiter::new(80, tenant.clone(), Default::default());
        assert!(a.memory_growing(0, 60, None).unwrap());
        assert!(!b.memory_growing(0, 60, None).unwrap());
        assert!(b.flags.memory_denied.load(Ordering::Acquire));
        assert!(b.memory_growing(0, 40, None).unwrap());
        assert!(!a.memory_growing(60, 90, None).unwrap(), "instance cap");
        drop(a);
        assert_eq!(tenant.used.load(Ordering::Acquire), 40);
        drop(b);
        assert_eq!(tenant.used.load(Ordering::Acquire), 0);
    }

    #[test]
    fn answers_are_held_against_the_tenant_until_released_or_dropped() {
        let tenant = Arc::new(TenantBudget::new(100));
        let mut a = MemoryLimiter::new(80, tenant.clone(), Default::default());
        assert!(a.memory_growing(0, 30, None).unwrap());
        assert!(!a.reserve_answer(51), "instance cap: 30 + 51 > 80");
        assert!(a.reserve_answer(50));
        assert!(!a.reserve_answer(21), "tenant budget: 80 + 21 > 100");
        assert_eq!(tenant.used.load(Ordering::Acquire), 80);
        a.release_answer();
        assert_eq!(tenant.used.load(Ordering::Acquire), 30);
        assert!(a.reserve_answer(40));
        assert!(a.keep_state(20));
        assert!(
            !a.keep_state(31),
            "a value is replaced, not added: 70 + 31 > 100"
        );
        assert_eq!(tenant.used.load(Ordering::Acquire), 70);
        assert!(a.keep_state(30));
        assert_eq!(tenant.used.load(Ordering::Acquire), 100);
        drop(a);
        assert_eq!(tenant.used.load(Ordering::Acquire), 0);
    }
}
