//! Helpers shared by the integration tests: real `redis-server` processes
//! (standalone and cluster) started per test, and the guest components built
//! from `guest-examples/`.
#![allow(dead_code)]

pub mod books;
pub mod fixtures;
pub mod guests;
pub mod host;
pub mod proxy;
pub mod redis;
pub mod stack;
