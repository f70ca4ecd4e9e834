//! HTTP API (stub, being written).
