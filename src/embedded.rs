//! Embedded redis-server (stub, being written).
