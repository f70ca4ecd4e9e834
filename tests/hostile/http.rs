//! Attacks on the HTTP edge: see `hostile.rs`.
