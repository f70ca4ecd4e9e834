//! How a run that did not return ended: each error of instantiation or of
//! `run` classified as the exact error kind the job reports (the guest's
//! trap or limit, or the node's own fault), with a bounded message.

use super::budget::RunFlags;
use super::run::RunOutcome;
use crate::model::ErrorKind;
use std::sync::atomic::Ordering;
use wasmtime::Trap;

/// Longest trap message kept in the report; backtraces of deep recursion
/// can be megabytes.
const MAX_MESSAGE: usize = 4 << 10;

/// Instantiation failed. The pool being full, or the operating system
/// refusing the instance memory or mappings (`ENOMEM` once a dense node
/// passes `vm.max_map_count`), is the node's fault: the job goes back to the
/// queue uncharged, bounded per job as every node fault. A limit the start
/// code hit is that limit; anything else will fail the same way every time
/// (a start function that traps, a data segment out of bounds): the
/// component is invalid.
pub(crate) fn classify_instantiation(
    e: &wasmtime::Error,
    flags: &RunFlags,
    timeout_ms: u64,
) -> RunOutcome {
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return RunOutcome::Failed {
            kind: ErrorKind::NodeFault,
            message: format!("this node is out of instance slots: {}", describe(e)),
        };
    }
    if os_refused(e) {
        return RunOutcome::Failed {
            kind: ErrorKind::NodeFault,
            message: format!("this node could not map the instance: {}", describe(e)),
        };
    }
    match classify(e, flags, timeout_ms) {
        RunOutcome::Failed {
            kind: ErrorKind::Trap,
            message,
        } => RunOutcome::Failed {
            kind: ErrorKind::InvalidComponent,
            message: format!("the component cannot be instantiated: {message}"),
        },
        other => other,
    }
}

/// Maps how the guest stopped to the contract's error kinds. The flags
/// recorded at the point of the stop are checked first: a limit that made
/// the guest trap is reported as that limit, not as the trap it caused.
pub(crate) fn classify(e: &wasmtime::Error, flags: &RunFlags, timeout_ms: u64) -> RunOutcome {
    if flags.cancelled.load(Ordering::Acquire) {
        return RunOutcome::Interrupted;
    }
    if flags.host_fault.load(Ordering::Acquire) {
        return RunOutcome::Failed {
            kind: ErrorKind::NodeFault,
            message: format!("host error: {}", describe(e)),
        };
    }
    let trap = e.downcast_ref::<Trap>().copied();
    if flags.timed_out.load(Ordering::Acquire) || trap == Some(Trap::Interrupt) {
        return RunOutcome::Failed {
            kind: ErrorKind::Timeout,
            message: format!("wall-clock limit of {timeout_ms} ms exceeded"),
        };
    }
    if trap == Some(Trap::OutOfFuel) {
        return RunOutcome::Failed {
            kind: ErrorKind::FuelExhausted,
            message: "fuel limit exhausted".to_string(),
        };
    }
    if flags.memory_denied.load(Ordering::Acquire) {
        return RunOutcome::Failed {
            kind: ErrorKind::MemoryLimit,
            message: format!("memory limit reached: {}", describe(e)),
        };
    }
    RunOutcome::Failed {
        kind: ErrorKind::Trap,
        message: describe(e),
    }
}

/// The error and its causes on one line, bounded.
/// Whether an OS error (an `mmap` or `mprotect` the kernel refused) is in
/// the error's chain: never the component's doing.
fn os_refused(e: &wasmtime::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some())
}

fn describe(e: &wasmtime::Error) -> String {
    let mut s = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [...]");
    }
    s
}

/// A failure of the host itself around a run (not the guest's doing): a
/// node fault, released uncharged, never the guest's `trap`.
pub(crate) fn host_failure(e: wasmtime::Error) -> RunOutcome {
    RunOutcome::Failed {
        kind: ErrorKind::NodeFault,
        message: format!("host error: {}", describe(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense node past `vm.max_map_count` fails to map an instance with
    /// ENOMEM: the node's fault (requeued uncharged), never the tenant's
    /// `invalid_component`, which is final.
    #[test]
    fn the_kernel_refusing_an_instance_is_a_node_fault() {
        let e = wasmtime::Error::from(std::io::Error::from_raw_os_error(libc::ENOMEM))
            .context("failed to map the memory image");
        match classify_instantiation(&e, &RunFlags::default(), 1_000) {
            RunOutcome::Failed { kind, message } => {
                assert_eq!(kind, ErrorKind::NodeFault, "{message}");
                assert!(message.contains("could not map"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
