//! Scheduler (stub, being written).
