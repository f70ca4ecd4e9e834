//! The context blob decoder over arbitrary bytes: contexts come back from
//! Redis, which is untrusted storage, so every input must decode or be
//! refused as `Corrupt`, never panic, hang or allocate without bound.
#![no_main]

use agentplane::context::HeavyContext;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    // The digest check passes, so the fuzzer reaches the parser itself.
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    if let Ok(ctx) = HeavyContext::decode(&digest, data) {
        // A context that decodes must also answer queries without panicking.
        let _ = ctx.search_text("a b", 3);
        if ctx.dim() > 0 {
            let _ = ctx.search(&vec![0.5; ctx.dim()], 3);
        }
        let _ = ctx.tools();
    }
});
