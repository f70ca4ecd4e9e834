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
    /// Runs `script` (its ARGV written by `args`) on every shard and sums
    /// the counts. A failing shard does not stop the others: every shard
    /// is tried, then the failures are answered together
    /// ([`CpError::Shards`]).
    async fn on_every_shard(
        &self,
        script: &'static super::scripts::Function,
        args: impl Fn(&mut super::scripts::Invocation),
    ) -> Result<u32, CpError> {
        let mut total = 0;
        let mut failed = Vec::new();
        for shard in 0..self.keys.shards() {
            let mut inv = script.key(self.keys.anchor(shard));
            args(&mut inv);
            match self.eval::<u32>(&mut inv, shard).await {
                Ok(n) => total += n,
                Err(e) => failed.push(format!("shard {shard}: {e}")),
            }
        }
        shards_result(total, failed)
    }

    /// Moves due delayed jobs to their queues on every shard; answers how
    /// many (see [`on_every_shard`](Self::on_every_shard) for failures).
    /// ARGV of `lua/promote.lua`: batch, prices.
    pub async fn promote(&self, batch: u32) -> Result<u32, CpError> {
        let prices = self.prices();
        self.on_every_shard(&scripts::PROMOTE, |inv| {
            inv.arg(batch.max(1));
            for p in prices {
                inv.arg(p);
            }
        })
        .await
    }

    /// Reclaims expired leases on every shard; answers how many. ARGV of
    /// `lua/reap.lua`: batch, prices.
    pub async fn reap(&self, batch: u32) -> Result<u32, CpError> {
        let prices = self.prices();
        self.on_every_shard(&scripts::REAP, |inv| {
            inv.arg(batch.max(1));
            for p in prices {
                inv.arg(p);
            }
        })
        .await
    }
}
