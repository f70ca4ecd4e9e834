-- RETAIN: forget what is older than the retention, in bounded batches.
--
-- Finished jobs (succeeded, failed, cancelled) are removed with their log
-- and their entries in the tenant's indexes (jobs:<t>, js:<t>:<state>) once
-- they finished more than `retention` ms ago: without this, every job ever
-- run stayed in Redis (1 MiB inputs included) and memory grew without bound.
-- Ledger entries older than the retention are folded into the tenant's
-- checkpoint (fields ck_grant, ck_reserve, ck_settle, ck_release: sums of the
-- folded amounts; ck_id: the last folded entry), so
--   granted  = ck_grant  + sum(grant entries)
--   settled  = ck_settle + sum(settle entries)
--   reserved = (ck_reserve + sum reserve) - (ck_settle + sum settle) - (ck_release + sum release)
-- hold exactly before and after. Every tenant's ledger is compacted, not
-- only the ledgers of tenants whose jobs expire (a tenant with only grants,
-- or only queued and running jobs, grew its ledger without bound): the index
-- `ledgers` (tenant -> ms of its oldest unfolded entry, kept by `ledger()` in
-- lib.lua) names the ledgers due, oldest first, at most 32 per call; a
-- ledger with more old entries than this call's budget keeps its old score
-- and is taken up again by the next call. (`compact`, the set earlier
-- versions used for that, is still drained.)
-- Deletes first (UNLINK/ZREM/XTRIM need no memory), so a Redis at its
-- maxmemory can still run it.
--
-- KEYS[1]  shard anchor (derived: done, hooks, j:<job>, log:<job>, jobs:<t>, js:<t>:*,
--          ledger:<t>, t:<t>, ledgers, compact)
-- ARGV[1]  jobs per call (>= 1)  ARGV[2]  retention ms
-- ARGV[3]  ledger entries folded per call (1..5000)
-- Returns: {jobs removed, ledger entries folded}
-- Errors:  malformed arguments (nothing written).
local batch, retention, budget = uint(ARGV[1]), uint(ARGV[2]), uint(ARGV[3])
if batch == nil or batch == 0 or retention == nil or budget == nil or budget == 0 or budget > 5000 then
  return fail('malformed arguments')
end
local COMPACT = B .. 'compact'
local terminal = { succeeded = true, failed = true, cancelled = true }
local cutoff = now_ms() - retention

local removed = 0
local tenants, order = {}, {}
local function touch(t)
  if t and t ~= '' and not tenants[t] then
    tenants[t] = true
    order[#order + 1] = t
  end
end

for _, jid in ipairs(redis.call('ZRANGEBYSCORE', DONE, '-inf', cutoff, 'LIMIT', 0, batch)) do
  local f = redis.call('HMGET', jkey(jid), 'tenant', 'state')
  local t, state = f[1], f[2]
  if t and state and terminal[state] then
    redis.call('ZREM', statekey(t, state), jid)
    redis.call('ZREM', jobskey(t), jid)
    -- UNLINK: a job hash with a 1 MiB input is freed in the background,
    -- not while this script holds Redis.
    redis.call('UNLINK', jkey(jid), B .. 'log:' .. jid)
    redis.call('ZREM', HOOKS, jid)
    removed = removed + 1
    touch(t)
  end
  -- A job that is gone already, or (should not happen) alive again, leaves
  -- the index either way: it is no longer this sweep's to remove.
  redis.call('ZREM', DONE, jid)
end

-- Tenants left over by earlier versions' calls, a few at a time.
for _, t in ipairs(redis.call('SPOP', COMPACT, 8)) do touch(t) end
-- Every ledger with entries past the retention, oldest first.
local LEDGERS = B .. 'ledgers'
for _, t in ipairs(redis.call('ZRANGEBYSCORE', LEDGERS, '-inf', '(' .. cutoff, 'LIMIT', 0, 32)) do
  touch(t)
end

-- Keeps `ledgers` on the oldest entry left (or drops a ledger with none,
-- or with no tenant hash to hold its checkpoint: nothing can be folded).
local function reindex(t)
  local first = redis.call('XRANGE', ledgerkey(t), '-', '+', 'COUNT', 1)[1]
  if first == nil or redis.call('EXISTS', tkey(t)) == 0 then
    redis.call('ZREM', LEDGERS, t)
  else
    redis.call('ZADD', LEDGERS, string.match(first[1], '^(%d+)'), t)
  end
end

local folded = 0
local bound = '(' .. cutoff .. '-0'
for _, t in ipairs(order) do
  local left = budget - folded
  if redis.call('EXISTS', tkey(t)) == 0 or left <= 0 then
    -- No tenant to hold the checkpoint: keep the entries. Out of budget:
    -- the index keeps the ledger's old score for the next call.
  else
    local e = redis.call('XRANGE', ledgerkey(t), '-', bound, 'COUNT', left)
    if #e > 0 then
      local sum = { grant = 0, reserve = 0, settle = 0, release = 0 }
      local ids = {}
      for _, entry in ipairs(e) do
        local kv = entry[2]
        local op, amount, released = nil, 0, 0
        for i = 1, #kv, 2 do
          if kv[i] == 'op' then
            op = kv[i + 1]
          elseif kv[i] == 'amount' then
            amount = tonumber(kv[i + 1]) or 0
          elseif kv[i] == 'released' then
            released = tonumber(kv[i + 1]) or 0
          end
        end
        if sum[op] ~= nil then sum[op] = sum[op] + amount end
        -- A settle's `released` is a release folded into the same entry.
        sum.release = sum.release + released
        ids[#ids + 1] = entry[1]
      end
      -- Exact MINID: removes precisely the entries read above (every entry up
      -- to the last one) and frees whole stream nodes, which XDEL would not.
      local ms, seq = string.match(ids[#ids], '^(%d+)-(%d+)$')
      redis.call('XTRIM', ledgerkey(t), 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
      -- '%d': Lua would render a large sum as 1e+15, which HINCRBY refuses.
      for _, op in ipairs({ 'grant', 'reserve', 'settle', 'release' }) do
        redis.call('HINCRBY', tkey(t), 'ck_' .. op, string.format('%d', sum[op]))
      end
      redis.call('HSET', tkey(t), 'ck_id', ids[#ids])
      folded = folded + #e
    end
  end
  reindex(t)
end
return { removed, folded }
