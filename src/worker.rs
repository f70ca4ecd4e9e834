//! Worker loop (stub, being written).
