//! The scheduler's maintenance: PROMOTE delayed jobs and REAP expired
//! leases on every shard, going on past a failing one.

use super::*;

/// The answer of a per-shard maintenance pass: the count, or every
/// shard's failure once all were tried.
fn shards_result(done: u32, failed: Vec<String>) -> Result<u32, CpError> {
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(CpError::Shards { done, failed })
    }
}

impl ControlPlane {
    /// Moves due delayed jobs to their queues on every shard; answers how
    /// many. A failing shard does not stop the others: every shard is tried,
    /// then the failures are answered together ([`CpError::Shards`]).
    pub async fn promote(&self, batch: u32) -> Result<u32, CpError> {
        let mut total = 0;
        let mut failed = Vec::new();
        for shard in 0..self.keys.shards() {
            let mut inv = scripts::PROMOTE.prepare_invoke();
            inv.key(self.keys.anchor(shard)).arg(batch.max(1));
            for p in self.prices() {
                inv.arg(p);
            }
            match self.eval::<u32>(&mut inv, shard).await {
                Ok(n) => total += n,
                Err(e) => failed.push(format!("shard {shard}: {e}")),
            }
        }
        shards_result(total, failed)
    }

    /// Reclaims expired leases on every shard; answers how many. Like
    /// [`promote`](Self::promote), a failing shard does not stop the others.
    pub async fn reap(&self, batch: u32) -> Result<u32, CpError> {
        let mut total = 0;
        let mut failed = Vec::new();
        for shard in 0..self.keys.shards() {
            let mut inv = scripts::REAP.prepare_invoke();
            inv.key(self.keys.anchor(shard)).arg(batch.max(1));
            self.retry().write(&mut inv);
            for p in self.prices() {
                inv.arg(p);
            }
            match self.eval::<u32>(&mut inv, shard).await {
                Ok(n) => total += n,
                Err(e) => failed.push(format!("shard {shard}: {e}")),
            }
        }
        shards_result(total, failed)
    }
}
