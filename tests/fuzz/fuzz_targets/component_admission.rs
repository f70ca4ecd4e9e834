//! Component admission over arbitrary bytes, with the workers' engine
//! configuration (`HostConfig::admission`): every input is admitted or
//! refused with a message, never a panic, and refused quickly (the
//! structural checks run before anything is compiled).
#![no_main]

use agentplane::host::{Host, HostConfig};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn host() -> &'static Host {
    static H: OnceLock<Host> = OnceLock::new();
    H.get_or_init(|| Host::new(HostConfig::admission()).expect("admission host"))
}

fuzz_target!(|data: &[u8]| {
    if let Err(e) = host().admit(data) {
        assert!(!e.to_string().is_empty());
    }
});
