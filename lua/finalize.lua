-- FINALIZE: settle attempts' costs, record their outcomes, release their
-- leases; one call ends one or more attempts (a worker sends the ends that
-- piled up while its previous call was in flight).
-- Once per attempt: the fencing token must be the current one and the job
-- running, so a second FINALIZE (or a stale worker's) changes nothing.
--
-- KEYS[1]  shard anchor            KEYS[1 + i]  job i's hash KEYS[1]:j:<job>
-- ARGV[1]  retry base ms        ARGV[2]  retry max ms
-- ARGV[3]  max state conflicts before the job fails
-- ARGV[4..7] prices (see SUBMIT)
-- ARGV[8]  node faults after which the job fails with `node_fault`
-- ARGV[9]  N, the number of attempts; then for each attempt i, 17 fields
--          from ARGV[10 + 17 * (i - 1)]:
--   job id, fencing token, outcome ('ok' | 'failed' | 'cancelled'),
--   error kind (failed), output (ok) or error message (failed), fuel used,
--   wall ms, log (already bounded), new state mode ('none' | 'inline' |
--   'blob'), the state's bytes ('blob': stored under its own key,
--   state:<tenant>:<agent>:<version>), retry jitter 0..999, outgoing HTTP
--   requests sent, their bytes both ways, and their price (credits, added
--   to the run's charge, which stays within its reservation), inference
--   tokens in, tokens out, and their price (credits, added the same way)
-- A tenant's cancel wins on every path: a flagged job ends `cancelled`
-- (its run is settled, its state not committed). Kind `node_fault` is the
-- node's failure: uncharged, not counted toward max_attempts, requeued
-- with backoff until the job's faults reach ARGV[8].
-- Then, optionally, the worker's next CLAIM, made by the same call once
-- every attempt is ended (as BullMQ's moveToFinished fetches the next
-- job): 4 more fields, worker id, max jobs, lease ms, claim id (see CLAIM;
-- no GPUs). The worker hands the slots these attempts held to the jobs it
-- gets, so a busy worker makes one call per batch, not two.
-- Returns: an array with one answer per attempt, in order, each
--          {status, ..., credits}: {'succeeded'} | {'failed'} | {'cancelled'}
--          | {'retry', delay_ms} | {'conflict'} | {'lost'}, followed (but for
--          'lost') by the job's credits settled over all its attempts.
--          With a CLAIM: {answers, claims}, claims as CLAIM answers them.
-- Errors:  malformed arguments (nothing written, for any attempt).
local base, maxd, max_conflicts = uint(ARGV[1]), uint(ARGV[2]), uint(ARGV[3])
local P = prices(ARGV[4], ARGV[5], ARGV[6], ARGV[7])
local max_faults, count = uint(ARGV[8]), uint(ARGV[9])
local STRIDE = 17
if base == nil or maxd == nil or max_conflicts == nil or P == nil or max_faults == nil
  or count == nil or count < 1 or #KEYS ~= count + 2 then
  return fail('malformed arguments')
end
local next_claim = nil
if #ARGV == 9 + STRIDE * count + 4 then
  local a = 9 + STRIDE * count
  next_claim = { ARGV[a + 1], ARGV[a + 2], '0', ARGV[a + 3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
    ARGV[a + 4] }
  local max_n, lease = uint(next_claim[2]), uint(next_claim[4])
  if next_claim[1] == '' or max_n == nil or lease == nil or lease == 0 or next_claim[9] == '' then
    return fail('malformed arguments')
  end
elseif #ARGV ~= 9 + STRIDE * count then
  return fail('malformed arguments')
end
local kinds = { agent_error = true, trap = true, fuel_exhausted = true, memory_limit = true,
  timeout = true, node_fault = true, invalid_component = true }

-- Every attempt's arguments are checked before anything is written.
local attempts = {}
for i = 1, count do
  local a = 9 + STRIDE * (i - 1)
  local x = { jid = ARGV[a + 1], token = uint(ARGV[a + 2]), outcome = ARGV[a + 3],
    kind = ARGV[a + 4], text = ARGV[a + 5], fuel = uint(ARGV[a + 6]), wall = uint(ARGV[a + 7]),
    log = ARGV[a + 8], smode = ARGV[a + 9], state = ARGV[a + 10], jitter = uint(ARGV[a + 11]),
    http_req = uint(ARGV[a + 12]), http_bytes = uint(ARGV[a + 13]), http_cost = uint(ARGV[a + 14]),
    tok_in = uint(ARGV[a + 15]), tok_out = uint(ARGV[a + 16]), tok_cost = uint(ARGV[a + 17]),
    key = KEYS[1 + i] }
  if x.token == nil or x.fuel == nil or x.wall == nil or x.jitter == nil or x.key ~= jkey(x.jid)
    or x.http_req == nil or x.http_bytes == nil or x.http_cost == nil or x.tok_in == nil
    or x.tok_out == nil or x.tok_cost == nil then
    return fail('malformed arguments')
  end
  if x.outcome ~= 'ok' and x.outcome ~= 'failed' and x.outcome ~= 'cancelled' then
    return fail('unknown outcome')
  end
  if x.outcome == 'failed' and not kinds[x.kind] then return fail('unknown error kind') end
  if x.smode ~= 'none' and x.smode ~= 'inline' and x.smode ~= 'blob' then
    return fail('unknown state mode')
  end
  attempts[i] = x
end

local now = now_ms()
-- Tenants read in this call (each once; their counts, money and virtual
-- time are written once, at the end; kept in the call's cache for the
-- CLAIM that may follow), whether each was eligible before it.
local tenants, was_eligible, order = call_tenants, {}, {}

local function finalize_one(x)
  local jid, token, outcome, kind, fuel, wall, smode = x.jid, x.token, x.outcome, x.kind, x.fuel,
    x.wall, x.smode
  local jitter = x.jitter
  local J = job_meta(x.key)
  if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
  local t = J.tenant
  local T = tenants[t]
  if T == nil then
    T = tenant_meta(tkey(t))
    tenants[t] = T
    was_eligible[t] = (T.parked or '') == ''
    order[#order + 1] = t
  end
  local g = n(J, 'gpus')
  local attempt = n(J, 'attempts')
  -- The node's failure, not the guest's: nothing of it is the tenant's.
  local fault = outcome == 'failed' and kind == 'node_fault'

  -- Money: the actual cost, never above what was reserved for this attempt.
  -- The job's fields are gathered here and written by `end_attempt`, in
  -- one HSET; the tenant's stay in T, written once per tenant at the end.
  local r = n(J, 'reserved')
  local jf = {}
  if fault then
    release_reservation(jid, J, T)
  else
    local cost = charge(fuel, wall, g, P) + x.http_cost + x.tok_cost
    if cost > r then cost = r end
    x.cost = cost
    T.settled = n(T, 'settled') + cost
    T.reserved = n(T, 'reserved') - r
    -- The tenant's running average of wall time (CLAIM's estimate), written
    -- with the money in one HSET.
    local avg = n(T, 'avg_ms')
    if avg <= 0 then avg = wall else avg = avg * 0.8 + wall * 0.2 end
    T.avg_ms = math.max(avg, 1)
    -- One entry: what was charged, and what of the reservation went back.
    ledger(t, 'settle', jid, attempt, cost, T, r - cost)
    jf = { 'reserved', '0', 'u_fuel', I(n(J, 'u_fuel') + fuel),
      'u_wall', I(n(J, 'u_wall') + wall), 'u_credits', I(n(J, 'u_credits') + cost) }
    if x.http_req > 0 or x.http_bytes > 0 then
      for _, f in ipairs({ 'u_http_req', I(n(J, 'u_http_req') + x.http_req),
        'u_http_bytes', I(n(J, 'u_http_bytes') + x.http_bytes) }) do jf[#jf + 1] = f end
    end
    -- Added where they are kept: only jobs that call models have them,
    -- so no other job reads them.
    if x.tok_in > 0 then redis.call('HINCRBY', x.key, 'u_tok_in', x.tok_in) end
    if x.tok_out > 0 then redis.call('HINCRBY', x.key, 'u_tok_out', x.tok_out) end
  end

  -- Fairness: replace the claim's estimate by the actual slot-time.
  if fault then
    correct_vtime(t, J, T, 0, true)
  else
    correct_vtime(t, J, T, wall * (1 + g * P.gpuw), true)
  end
  -- The job's fields of the attempt's end join the HSET of its outcome
  -- (`hold`): one write of the job hash on the common path, a success
  -- with no agent state; every other path writes them first.
  local hold = {}
  end_attempt(jid, J, T, nil, jf, true, hold)
  if outcome ~= 'ok' or J.cancel == '1' or (J.agent_id or '') ~= '' then
    redis.call('HSET', x.key, unpack(hold))
    hold = {}
  end

  -- The log is this attempt's: written if any, and a previous attempt's
  -- removed (a first attempt has none to remove).
  if x.log ~= '' then
    redis.call('SET', B .. 'log:' .. jid, x.log)
  elseif attempt > 1 then
    redis.call('DEL', B .. 'log:' .. jid)
  end

  local result
  if outcome == 'cancelled' or J.cancel == '1' then
    -- The tenant's cancel wins on every path: no retry, no requeue on a
    -- state conflict, no commit of the agent's state.
    finish_cancelled(jid, J, now)
    result = { 'cancelled' }
  elseif outcome == 'ok' then
    local conflict = false
    if (J.agent_id or '') ~= '' and smode ~= 'none' then
      local akey = agentkey(t, J.agent_id)
      local A = hgetall(akey)
      if n(A, 'version') ~= n(J, 'sver') then
        conflict = true
      else
        local v = n(A, 'version') + 1
        -- The superseded large version goes in the same step: CLAIM reads a
        -- blob atomically with the pointer, so no reader can miss it. (A
        -- legacy `ptr` blob may be shared by tenants and is left alone.)
        if (A.blob or '') ~= '' then
          redis.call('DEL', stateblobkey(t, J.agent_id, A.blob))
        end
        if smode == 'inline' then
          redis.call('HSET', akey, 'version', I(v), 'inline', x.state, 'blob', '', 'ptr', '')
        else
          redis.call('SET', stateblobkey(t, J.agent_id, I(v)), x.state)
          redis.call('HSET', akey, 'version', I(v), 'inline', '', 'blob', I(v), 'ptr', '')
        end
      end
    end
    if conflict then
      local c = n(J, 'conflicts') + 1
      redis.call('HSET', x.key, 'conflicts', I(c))
      if c > max_conflicts then
        redis.call('HSET', x.key, 'ekind', 'agent_error',
          'emsg', 'agent state changed under this job ' .. c .. ' times; giving up')
        finish(jid, J, 'failed', now)
        result = { 'failed' }
      else
        -- The run was valid work (charged), but its state is stale: run again
        -- at once, without using up an attempt (its run number stays used).
        uncount(jid, J)
        requeue(jid, J, T)
        result = { 'conflict' }
      end
    else
      for _, f in ipairs({ 'output', x.text, 'ekind', '', 'emsg', '' }) do hold[#hold + 1] = f end
      finish(jid, J, 'succeeded', now, hold)
      result = { 'succeeded' }
    end
  elseif fault then
    result = node_fault(jid, J, T, x.text, max_faults, base, maxd, jitter, now)
  else
    redis.call('HSET', x.key, 'ekind', kind, 'emsg', x.text)
    result = retry_or_fail(jid, J, T, kind == 'agent_error' or kind == 'trap', base, maxd, jitter, now)
  end
  result[#result + 1] = I(n(J, 'u_credits') + (x.cost or 0))
  return result
end

local out = {}
for i, x in ipairs(attempts) do out[i] = finalize_one(x) end
-- Each tenant is re-decided once. Workers waiting for work are woken only
-- when one becomes eligible: while it was, no worker that could take its
-- head waits (a CLAIM would have taken it), as in SUBMIT.
local woken = false
for _, t in ipairs(order) do
  local T = tenants[t]
  if was_eligible[t] and (T.parked or '') == '' then
    -- Still eligible, with the same head: ending runs only lowers its
    -- running count and GPUs and frees credits (free credits grow by the
    -- reservation less the cost), and the balance still covers the head
    -- (it covers the free credits, which cover the head). Only its virtual
    -- time moved: re-score it where it is.
    rescore(t, T, n(T, 'vtime'))
  elseif refresh(t, T, P) and not was_eligible[t] then
    woken = true
  end
  local f = { 'running', I(n(T, 'running')), 'gpus', I(n(T, 'gpus')),
    'settled', I(n(T, 'settled')), 'reserved', I(n(T, 'reserved')), 'vtime', n(T, 'vtime') }
  if T.avg_ms ~= nil then
    f[#f + 1] = 'avg_ms'
    f[#f + 1] = T.avg_ms
  end
  redis.call('HSET', tkey(t), unpack(f))
  -- No run of the tenant is left: its group's consumers hold nothing.
  if n(T, 'running') == 0 then retire_idle_consumers(t) end
end
if woken then wake() end
if next_claim then
  return { out, run_claim({ KEYS[1], KEYS[#KEYS] }, next_claim) }
end
return out
