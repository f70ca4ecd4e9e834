//! `wasi:random` as this host serves it: wasmtime-wasi's generators, but
//! every call charged like the host's own imports, and every answer held
//! against the tenant's memory budget like theirs. Bounded per call only
//! (`sandbox::MAX_RANDOM_BYTES`), a loop of a few wasm instructions made
//! the host generate 64 KiB per turn for free.

use super::limits::CALL_FUEL;
use super::sandbox::MAX_RANDOM_BYTES;
use super::state::RunState;
use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::p2::bindings::random::{insecure, insecure_seed, random};

/// Fuel per byte of randomness handed out, at the rate of `CALL_FUEL` (a
/// unit of fuel ~ a nanosecond of host CPU). wasmtime-wasi draws a whole
/// word per byte: measured ~470 µs per 64 KiB call of `get-random-bytes`
/// (~7 ns a byte) and ~190 µs of `get-insecure-random-bytes`, so a byte of
/// either costs 8: one 64 KiB call ~0.5M fuel.
pub(crate) const RANDOM_BYTE_FUEL: u64 = 8;

/// Replaces the `wasi:random` interfaces `wasmtime_wasi::p2::add_to_linker_async`
/// put in `linker` with the charged ones below.
pub(crate) fn shadow(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    random::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    insecure::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    insecure_seed::add_to_linker::<_, HasSelf<RunState>>(linker, |s| s)?;
    linker.allow_shadowing(false);
    Ok(())
}

impl RunState {
    /// Charges and holds an answer of `len` random bytes. Over the per-call
    /// bound it is left to wasmtime-wasi, which refuses it with a trap.
    fn random_bytes(&mut self, len: u64) -> wasmtime::Result<()> {
        self.begin_call(CALL_FUEL)?;
        if len > MAX_RANDOM_BYTES {
            return Ok(());
        }
        self.hold_answer(len as usize)?;
        self.charge(len * RANDOM_BYTE_FUEL)
    }
}

impl random::Host for RunState {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.random_bytes(len)?;
        random::Host::get_random_bytes(self.wasi().random(), len)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.begin_call(CALL_FUEL)?;
        random::Host::get_random_u64(self.wasi().random())
    }
}

impl insecure::Host for RunState {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.random_bytes(len)?;
        insecure::Host::get_insecure_random_bytes(self.wasi().random(), len)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.begin_call(CALL_FUEL)?;
        insecure::Host::get_insecure_random_u64(self.wasi().random())
    }
}

impl insecure_seed::Host for RunState {
    fn insecure_seed(&mut self) -> wasmtime::Result<(u64, u64)> {
        self.begin_call(CALL_FUEL)?;
        insecure_seed::Host::insecure_seed(self.wasi().random())
    }
}
