//! The key schema (documented in `lua/README.md`). Every key of a shard
//! carries the shard's hash tag, so each script's keys share one slot.

/// Names keys for one deployment (`prefix`) spread over `shards`.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
    shards: u32,
}

impl KeySpace {
    pub fn new(prefix: &str, shards: u32) -> Self {
        KeySpace {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Which shard owns a tenant: a stable hash, so every process agrees
    /// without a lookup.
    pub fn shard_of(&self, tenant: &str) -> u32 {
        // FNV-1a: tiny, stable across versions and platforms.
        let mut h: u32 = 0x811c_9dc5;
        for b in tenant.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        h % self.shards
    }

    /// The hash tag of a shard, `{prefix:sN}` (KEYS[1] of every script).
    pub fn tag(&self, shard: u32) -> String {
        format!("{{{}:s{}}}", self.prefix, shard)
    }

    pub fn tenant_tag(&self, tenant: &str) -> String {
        self.tag(self.shard_of(tenant))
    }

    /// The shard's anchor, `{prefix:sN}:anchor` (KEYS[1] of every script):
    /// a key that always exists on the node that holds the shard, so a
    /// cluster routes each script to where the shard's data is, and whose
    /// value (`ready` / `moving`) lets an operator pause the shard while its
    /// slot moves (every script refuses with TRYAGAIN, writing nothing).
    pub fn anchor(&self, shard: u32) -> String {
        format!("{}:anchor", self.tag(shard))
    }

    /// `{prefix:sN}:absent`, a key that never exists, declared as the last
    /// key of every script. While the shard's slot migrates, a Redis
    /// Cluster runs no command whose declared keys are not all present on
    /// one node: the source answers ASK and the target TRYAGAIN. So no
    /// script runs while the shard is split between two nodes (it would
    /// read half the data, or fail part-way on a key already moved, after
    /// some of its writes); the Rust side retries until the move is done.
    pub fn absent(&self, shard: u32) -> String {
        format!("{}:absent", self.tag(shard))
    }

    /// A credit grant's idempotency record,
    /// `{prefix:sN}:gidem:<tenant>:<sha256(key)>`: `amount \n balance`.
    pub fn grant_idempotency(&self, tenant: &str, key_hash: &str) -> String {
        format!("{}:gidem:{}:{}", self.tenant_tag(tenant), tenant, key_hash)
    }

    pub fn tenant_anchor(&self, tenant: &str) -> String {
        self.anchor(self.shard_of(tenant))
    }

    pub fn tenant(&self, tenant: &str) -> String {
        format!("{}:t:{}", self.tenant_tag(tenant), tenant)
    }

    pub fn job(&self, tenant: &str, job: &str) -> String {
        format!("{}:j:{}", self.tenant_tag(tenant), job)
    }

    pub fn job_log(&self, tenant: &str, job: &str) -> String {
        format!("{}:log:{}", self.tenant_tag(tenant), job)
    }

    pub fn jobs(&self, tenant: &str) -> String {
        format!("{}:jobs:{}", self.tenant_tag(tenant), tenant)
    }

    pub fn jobs_in_state(&self, tenant: &str, state: &str) -> String {
        format!("{}:js:{}:{}", self.tenant_tag(tenant), tenant, state)
    }

    /// `key_hash` is the sha256 hex of the client's Idempotency-Key, so a
    /// hostile key cannot shape our key names.
    pub fn idempotency(&self, tenant: &str, key_hash: &str) -> String {
        format!("{}:idem:{}:{}", self.tenant_tag(tenant), tenant, key_hash)
    }

    pub fn ledger(&self, tenant: &str) -> String {
        format!("{}:ledger:{}", self.tenant_tag(tenant), tenant)
    }

    pub fn queue(&self, tenant: &str) -> String {
        format!("{}:q:{}", self.tenant_tag(tenant), tenant)
    }

    pub fn agent(&self, tenant: &str, agent: &str) -> String {
        format!("{}:agent:{}:{}", self.tenant_tag(tenant), tenant, agent)
    }

    /// A large agent state, one key per committed version (the agent
    /// hash's `blob` field names the version). Same shard as the agent, so
    /// FINALIZE replaces it atomically and CLAIM reads it with its version.
    pub fn agent_state_blob(&self, tenant: &str, agent: &str, version: u64) -> String {
        format!(
            "{}:state:{}:{}:{}",
            self.tenant_tag(tenant),
            tenant,
            agent,
            version
        )
    }

    /// The tenant's sealed secrets, name -> `<ms set>:<sealed value>`.
    pub fn secrets(&self, tenant: &str) -> String {
        format!("{}:secrets:{}", self.tenant_tag(tenant), tenant)
    }

    pub fn component(&self, tenant: &str, digest: &str) -> String {
        format!("{}:comp:{}:{}", self.tenant_tag(tenant), tenant, digest)
    }

    pub fn context(&self, tenant: &str, name: &str) -> String {
        format!("{}:ctx:{}:{}", self.tenant_tag(tenant), tenant, name)
    }

    pub fn wake(&self, shard: u32) -> String {
        format!("{}:wake", self.tag(shard))
    }

    /// Content-addressed blobs (components, contexts, large agent states)
    /// carry no hash tag, so a cluster spreads them over all nodes.
    pub fn blob(&self, kind: &str, digest: &str) -> String {
        format!("{}:blob:{}:{}", self.prefix, kind, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_keys_share_their_shard_tag() {
        let ks = KeySpace::new("ap", 8);
        let tag = ks.tenant_tag("acme");
        assert!(tag.starts_with("{ap:s") && tag.ends_with('}'));
        for k in [
            ks.tenant("acme"),
            ks.job("acme", "01J"),
            ks.queue("acme"),
            ks.ledger("acme"),
            ks.idempotency("acme", "ff"),
        ] {
            assert!(k.starts_with(&tag), "{k} lacks {tag}");
        }
        assert!(!ks.blob("comp", "sha256:00").contains('{'));
    }

    #[test]
    fn shards_spread_tenants() {
        let ks = KeySpace::new("ap", 4);
        let mut seen = [0u32; 4];
        for i in 0..400 {
            seen[ks.shard_of(&format!("tenant-{i}")) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
        assert_eq!(KeySpace::new("ap", 1).shard_of("x"), 0);
    }
}
