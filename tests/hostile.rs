//! Hostile tenants: every attack a tenant can mount through the public
//! surface (uploads, job requests, its own guest code, raw HTTP), each
//! asserted to be bounded, charged or refused with its exact error kind,
//! while a victim tenant's jobs running alongside succeed.
//!
//! - `host`: attacks from inside a guest (free runs, pool exhaustion,
//!   compile bombs, admission vs execution, host-call amplification).
//! - `http`: attacks on the HTTP edge (slow and half-sent requests,
//!   connection floods, upload starvation, numbers, bad input).

mod common;

#[path = "hostile/host.rs"]
mod host;
#[path = "hostile/http.rs"]
mod http;
