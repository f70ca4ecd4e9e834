//! Attacks from inside a guest: see `hostile.rs`.
