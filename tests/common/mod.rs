//! Helpers shared by the integration tests: real `redis-server` processes
//! (standalone and cluster) started per test (`redis`, `proxy`), the guest
//! components built from `guest-examples/` (`guests`) and loaded into a host
//! (`host`), the process stack and worker processes (`stack`), the control
//! fixtures (`fixtures`), the ledger checks (`books`) and an HTTP server
//! for agents to call (`upstream`), and an OpenAI-compatible model server
//! (`openai`).
#![allow(dead_code)]

pub mod books;
pub mod fixtures;
pub mod guests;
pub mod host;
pub mod openai;
pub mod proxy;
pub mod redis;
pub mod stack;
pub mod upstream;
