-- CLAIM: hand up to N ready jobs to a worker, fairly.
--
-- Weighted fair queuing over slot-time: each eligible tenant sits in an
-- active set scored by its virtual time; the lowest goes first. Claiming
-- advances it by the estimated slot-time (tenant's average wall ms, GPUs
-- weighted) divided by its weight; FINALIZE corrects by the actual time.
-- Each pick is O(log n) in tenants: parked tenants are in no set.
--
-- KEYS[1]  shard anchor (all other keys derive from its tag: act:cpu, act:gpu,
--          act:gpu:n, act:gpu:<g>, vclock, fence, leases, t:<tenant>,
--          q:<tenant>, j:<job>, js:*, ledger:<tenant>, agent:<tenant>:<agent>)
-- ARGV[1]  worker id (the consumer name in each tenant's group)
-- ARGV[2]  max jobs             ARGV[3]  free GPU slots of the worker
-- ARGV[4]  lease ms             ARGV[5..8] prices (see SUBMIT)
-- ARGV[9]  claim id: unique per call, reused when the caller retries a call
--          whose answer it never got. The jobs a call leased are recorded
--          under KEYS[1]:claim:<worker>:<claim id> for one lease; a retry
--          that finds the record answers those jobs again (lease renewed)
--          instead of leasing more, so a lost answer strands nothing.
-- Returns: array of claims, each an array:
--   {job, tenant, token, attempt, component, input, contexts, gpus, fuel,
--    memory_bytes, timeout_ms, agent_id, state|'', legacy_state_ptr|'', state_version,
--    egress, max_tokens, models, weight}
--   `egress` is the tenant's `allowed_outbound_hosts` as stored (rules one
--   per line, '' for none), read with the tenant: the run gets the policy
--   as of its claim. `max_tokens` is the job's token allowance (fixed at
--   SUBMIT) and `models` the tenant's model grants as stored (`model in
--   out` per line), read for a job with an allowance only; `weight` is the
--   tenant's, which the node's models share their turns by.
--   `attempt` is the run number: every claim of a job takes the next one.
--   `state` carries the agent's state whether stored inline or as a large
--   blob (read here, atomically with the version, so a concurrent FINALIZE
--   that deletes the superseded blob cannot pull it from under the claim).
-- Errors: malformed arguments (nothing written). Nothing after the checks
-- raises: a script error would keep the jobs already leased in this call
-- (Redis does not roll a script back) and hand them to no one.
local worker, cid = ARGV[1], ARGV[9]
local max_n, free_gpus, lease = uint(ARGV[2]), uint(ARGV[3]), uint(ARGV[4])
local P = prices(ARGV[5], ARGV[6], ARGV[7], ARGV[8])
if worker == '' or max_n == nil or free_gpus == nil or lease == nil or lease == 0 or P == nil
  or cid == nil or cid == '' then
  return fail('malformed arguments')
end
local now = now_ms()
local now_s, until_s = I(now), I(now + lease)
local out = {}
local gpus_left = free_gpus
local record = B .. 'claim:' .. worker .. ':' .. cid

-- One claim's answer: what the worker needs to run the job. The agent's
-- state is read here, atomically with its version.
local function entry(jid, t, J, T, token, attempt)
  local g = n(J, 'gpus')
  local fuel, timeout, memory = effective(J, T)
  local sinline, sptr, sver = '', '', 0
  if (J.agent_id or '') ~= '' then
    local A = hgetall(agentkey(t, J.agent_id))
    sinline, sptr, sver = A.inline or '', A.ptr or '', n(A, 'version')
    if (A.blob or '') ~= '' then
      local bytes = redis.call('GET', stateblobkey(t, J.agent_id, A.blob))
      if bytes then
        sinline = bytes
      else
        -- Lost (never by the scripts): the Rust side reports it as missing.
        sptr = 'lost:' .. A.blob
      end
    end
    redis.call('HSET', jkey(jid), 'sver', I(sver))
  end
  -- The input (large) and the token allowance (only jobs that call
  -- models have one) are read here only, with one command.
  local iv = redis.call('HMGET', jkey(jid), 'input', 'max_tokens')
  local max_tokens, models = tonumber(iv[2] or 0) or 0, ''
  if max_tokens > 0 then models = redis.call('HGET', tkey(t), 'models') or '' end
  return { jid, t, token, attempt, J.component, iv[1],
    J.contexts or '[]', g, fuel, memory, timeout, J.agent_id or '', sinline, sptr, sver,
    T.egress or '', max_tokens, models, n(T, 'weight') }
end

-- A retried call: answer what the first one leased, if still this
-- worker's under the same token (a job cancelled, reaped or finished
-- meanwhile is left out), and renew those leases.
local prev = redis.call('GET', record)
if prev then
  for jid, token in string.gmatch(prev, '([^ ]+) ([^ ]+)\n') do
    local J = job_meta(jkey(jid))
    if J.state == 'running' and J.worker == worker and n(J, 'token') == tonumber(token) then
      redis.call('HSET', jkey(jid), 'lease_until', until_s)
      redis.call('ZADD', LEASES, until_s, jid)
      out[#out + 1] = entry(jid, J.tenant, J, tenant_meta(tkey(J.tenant)), tonumber(token), n(J, 'attempts'))
    end
  end
  return out
end
local leased = {}

-- The eligible tenant with the lowest virtual time whose next job fits:
-- the CPU set's first, or the first of each GPU bucket that fits the free
-- GPUs (one ZRANGE per bucket, never a scan of the tenants that do not fit).
-- Answers the tenant and the set it is in (ACT_CPU or ACT_GPU).
local function pick()
  local best, best_v, from = nil, nil, nil
  local c = redis.call('ZRANGE', ACT_CPU, 0, 0, 'WITHSCORES')
  if #c > 0 then best, best_v, from = c[1], tonumber(c[2]), ACT_CPU end
  if gpus_left > 0 then
    local gs = redis.call('ZRANGEBYSCORE', GBUCKETS, 1, gpus_left)
    for _, g in ipairs(gs) do
      local e = redis.call('ZRANGE', gbucket(g), 0, 0, 'WITHSCORES')
      if #e > 0 and (best_v == nil or tonumber(e[2]) < best_v) then
        best, best_v, from = e[1], tonumber(e[2]), ACT_GPU
      end
    end
  end
  return best, from
end

-- Takes back a delivery that was not the head: a running job's own entry
-- goes back to the consumer that runs it (its PEL entry witnesses its
-- lease); any other is acknowledged, so no stray PEL entry stays behind.
local function undeliver(t, e)
  local jid = e[2] and e[2][2]
  local J = jid and job_meta(jkey(jid)) or {}
  if J.state == 'running' and J.sid == e[1] and (J.worker or '') ~= '' then
    redis.call('XCLAIM', qkey(t), GROUP, J.worker, 0, e[1])
  else
    redis.call('XACK', qkey(t), GROUP, e[1])
  end
end

-- Delivers t's head entry `sid` to this worker. The group's last-delivered
-- id moves in step with the tenant's qlast; should they ever part (a
-- script that failed halfway, a partial restore) the group is put back on
-- qlast and the wrong delivery taken back, and a lost group is recreated
-- on qlast, rather than every CLAIM on the shard failing (and leaving one
-- more PEL entry each time).
local function deliver(t, T, sid)
  local last = T.qlast
  if last == nil or last == '' then last = '0-0' end
  for try = 1, 2 do
    local got = redis.pcall('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', 1, 'STREAMS', qkey(t), '>')
    if type(got) == 'table' and got.err then
      -- The group itself is gone (NOGROUP: a lost or partial restore).
      -- Recreate it on qlast, so the entries before it stay delivered.
      if not string.find(got.err, 'NOGROUP', 1, true) then return false end
      redis.call('XGROUP', 'CREATE', qkey(t), GROUP, last)
      got = redis.call('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', 1, 'STREAMS', qkey(t), '>')
    end
    local e = got and got[1] and got[1][2][1]
    if e and e[1] == sid then return true end
    if e then undeliver(t, e) end
    if try == 1 then redis.call('XGROUP', 'SETID', qkey(t), GROUP, last) end
  end
  return false
end

-- Every pass either claims, or fails / drops a head, or parks a tenant;
-- the cap is a backstop against a loop this file did not foresee.
local passes = 0
-- Tenant hashes read in this call: every write below updates the table
-- with the hash, so a tenant picked again is not read again. The call's
-- shared cache (`call_tenants`): a FINALIZE that goes on to claim has read
-- and written its tenants there already.
local tenants = call_tenants
-- Each served tenant's next head, as the `refresh` after its claim read
-- it: valid while its `qlast` is unchanged (nothing else in this call
-- touches its stream without clearing the entry).
local heads = {}
-- Tenants whose claim fields (vtime, qlast, counts) changed: each is
-- written with one HSET after the loop (its table `T` is what every
-- decision in the loop reads meanwhile).
local dirty = {}
-- Fencing tokens: the shard's counter is moved once per call, by what this
-- call may still hand out, on its first claim; tokens only need to grow
-- and never repeat, so those not handed out are simply never used.
local tokens_next, tokens_last = 0, -1
local function next_token()
  if tokens_next > tokens_last then
    tokens_last = redis.call('INCRBY', FENCE, max_n - #out)
    tokens_next = tokens_last - (max_n - #out) + 1
  end
  tokens_next = tokens_next + 1
  return tokens_next - 1
end
while #out < max_n and passes < 4 * max_n + 64 do
  passes = passes + 1
  local t, from = pick()
  if t == nil then break end
  local T = tenants[t] or tenant_meta(tkey(t))
  tenants[t] = T
  local sid, jid, J
  local h = heads[t]
  heads[t] = nil
  if h and h.qlast == T.qlast then
    sid, jid, J = h.sid, h.jid, h.J
  else
    sid, jid = head(t, T)
    J = jid and job_meta(jkey(jid)) or nil
  end
  local ok = J ~= nil and J.state == 'queued'
  if not ok then
    -- A stale head (should not happen: CANCEL deletes its entry). Drop it
    -- from the tenant's view and re-decide, so CLAIM can never spin.
    if sid then
      redis.call('XDEL', qkey(t), sid)
    end
    refresh(t, T, P)
  elseif n(J, 'gpus') > gpus_left or never_runs(J, T, P) then
    -- Its bucket is out of date, or the head can no longer run: re-decide
    -- (refresh fails an impossible head and rebuckets the tenant).
    refresh(t, T, P)
  elseif not deliver(t, T, sid) then
    deactivate(t, T)
    redis.call('HSET', tkey(t), 'parked', 'stream_out_of_step')
    T.parked = 'stream_out_of_step'
  else
    local g = n(J, 'gpus')
    local fuel, timeout, memory = effective(J, T)
    local r = reservation(fuel, timeout, g, P, J)
    local token = next_token()
    local attempt = n(J, 'attempts') + 1
    local est = math.max(n(T, 'avg_ms'), 1) * (1 + g * P.gpuw)
    local weight = math.max(n(T, 'weight'), 1)
    local v = n(T, 'vtime')
    -- The shard's clock follows the lowest virtual time actually served.
    advance_vclock(v)
    T.vtime = v + est / weight
    T.qlast = sid
    T.running = n(T, 'running') + 1
    T.gpus = n(T, 'gpus') + g
    T.reserved = n(T, 'reserved') + r
    T.queued = n(T, 'queued') - 1
    -- Written once per tenant, after the loop (`dirty`).
    if not dirty[t] then
      dirty[t] = true
      dirty[#dirty + 1] = t
    end
    local started = J.started
    if started == nil or started == '' then started = now_s end
    -- `cw`: the weight `est` is charged at, which FINALIZE, RELEASE and
    -- REAP correct with (the tenant's weight may change meanwhile).
    move_state(jid, J, 'running')
    redis.call('HSET', jkey(jid), 'state', 'running', 'attempts', I(attempt),
      'counted', I(counted(J) + 1), 'token', I(token), 'worker', worker,
      'lease_until', until_s, 'reserved', I(r), 'est', est, 'cw', I(weight),
      'started', started, 'sid', sid)
    redis.call('ZADD', LEASES, until_s, jid)
    ledger(t, 'reserve', jid, attempt, r, T)
    -- Re-score (at its new virtual time) or park the tenant for its next
    -- job, and keep that job for the next pick of this tenant.
    local _, hsid, hjid, hJ = refresh(t, T, P, from)
    if hsid then heads[t] = { qlast = T.qlast, sid = hsid, jid = hjid, J = hJ } end
    gpus_left = gpus_left - g
    out[#out + 1] = entry(jid, t, J, T, token, attempt)
    leased[#leased + 1] = jid .. ' ' .. token .. '\n'
  end
end
for _, t in ipairs(dirty) do
  local T = tenants[t]
  redis.call('HSET', tkey(t), 'vtime', T.vtime, 'qlast', T.qlast, 'running', I(T.running),
    'gpus', I(T.gpus), 'reserved', I(T.reserved), 'queued', I(T.queued))
end
flush_vclock()
if #leased > 0 then
  redis.call('SET', record, table.concat(leased), 'PX', lease)
end
return out
