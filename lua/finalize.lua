-- FINALIZE: settle an attempt's cost, record its outcome, release its lease.
-- Once per attempt: the fencing token must be the current one and the job
-- running, so a second FINALIZE (or a stale worker's) changes nothing.
--
-- KEYS[1]  shard anchor            KEYS[2]  job hash KEYS[1]:j:<job>
-- ARGV[1]  job id               ARGV[2]  fencing token
-- ARGV[3]  outcome: 'ok' | 'failed' | 'cancelled'
-- ARGV[4]  error kind (failed)  ARGV[5]  output (ok) or error message (failed)
-- ARGV[6]  fuel used            ARGV[7]  wall ms
-- ARGV[8]  log (already bounded)
-- ARGV[9]  new state: 'none' | 'inline' | 'blob'   ARGV[10] the state's bytes
--          ('blob': stored under its own key, state:<tenant>:<agent>:<version>)
-- ARGV[11] retry base ms        ARGV[12] retry max ms   ARGV[13] jitter 0..999
-- ARGV[14] max state conflicts before the job fails
-- ARGV[15..18] prices (see SUBMIT)
-- ARGV[19] node faults after which the job fails with `node_fault`
-- A tenant's cancel wins on every path: a flagged job ends `cancelled`
-- (its run is settled, its state not committed). Kind `node_fault` is the
-- node's failure: uncharged, not counted toward max_attempts, requeued
-- with backoff until the job's faults reach ARGV[19].
-- Returns: {'succeeded'} | {'failed'} | {'cancelled'}
--          | {'retry', delay_ms} | {'conflict'} | {'lost'}
-- Errors:  malformed arguments (nothing written).
local jid, token, outcome, kind = ARGV[1], uint(ARGV[2]), ARGV[3], ARGV[4]
local fuel, wall = uint(ARGV[6]), uint(ARGV[7])
local smode = ARGV[9]
local base, maxd, jitter, max_conflicts = uint(ARGV[11]), uint(ARGV[12]), uint(ARGV[13]), uint(ARGV[14])
local P = prices(ARGV[15], ARGV[16], ARGV[17], ARGV[18])
local max_faults = uint(ARGV[19])
local kinds = { agent_error = true, trap = true, fuel_exhausted = true, memory_limit = true,
  timeout = true, node_fault = true, invalid_component = true }
if token == nil or fuel == nil or wall == nil or base == nil or maxd == nil or jitter == nil
  or max_conflicts == nil or P == nil or max_faults == nil or KEYS[2] ~= jkey(jid) then
  return fail('malformed arguments')
end
if outcome ~= 'ok' and outcome ~= 'failed' and outcome ~= 'cancelled' then return fail('unknown outcome') end
if outcome == 'failed' and not kinds[kind] then return fail('unknown error kind') end
if smode ~= 'none' and smode ~= 'inline' and smode ~= 'blob' then return fail('unknown state mode') end

local J = job_meta(KEYS[2])
if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
local t = J.tenant
local T = hgetall(tkey(t))
local now = now_ms()
local g = n(J, 'gpus')
local attempt = n(J, 'attempts')
-- The node's failure, not the guest's: nothing of it is the tenant's.
local fault = outcome == 'failed' and kind == 'node_fault'

-- Money: the actual cost, never above what was reserved for this attempt.
local r = n(J, 'reserved')
if fault then
  release_reservation(jid, J, T)
else
  local cost = charge(fuel, wall, g, P)
  if cost > r then cost = r end
  T.settled = n(T, 'settled') + cost
  T.reserved = n(T, 'reserved') - r
  -- The tenant's running average of wall time (CLAIM's estimate), written
  -- with the money in one HSET.
  local avg = n(T, 'avg_ms')
  if avg <= 0 then avg = wall else avg = avg * 0.8 + wall * 0.2 end
  T.avg_ms = math.max(avg, 1)
  redis.call('HSET', tkey(t), 'settled', I(T.settled), 'reserved', I(T.reserved),
    'avg_ms', T.avg_ms)
  ledger(t, 'settle', jid, attempt, cost, T)
  if r - cost > 0 then ledger(t, 'release', jid, attempt, r - cost, T) end
  redis.call('HSET', KEYS[2], 'reserved', 0, 'u_fuel', I(n(J, 'u_fuel') + fuel),
    'u_wall', I(n(J, 'u_wall') + wall), 'u_credits', I(n(J, 'u_credits') + cost))
end

end_attempt(jid, J, T)

-- Fairness: replace the claim's estimate by the actual slot-time.
if fault then
  correct_vtime(t, J, T, 0)
else
  correct_vtime(t, J, T, wall * (1 + g * P.gpuw))
end

-- The log is this attempt's: written if any, and a previous attempt's
-- removed (a first attempt has none to remove).
if ARGV[8] ~= '' then
  redis.call('SET', B .. 'log:' .. jid, ARGV[8])
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
        redis.call('HSET', akey, 'version', I(v), 'inline', ARGV[10], 'blob', '', 'ptr', '')
      else
        redis.call('SET', stateblobkey(t, J.agent_id, I(v)), ARGV[10])
        redis.call('HSET', akey, 'version', I(v), 'inline', '', 'blob', I(v), 'ptr', '')
      end
    end
  end
  if conflict then
    local c = n(J, 'conflicts') + 1
    redis.call('HSET', KEYS[2], 'conflicts', I(c))
    if c > max_conflicts then
      redis.call('HSET', KEYS[2], 'ekind', 'agent_error',
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
    redis.call('HSET', KEYS[2], 'output', ARGV[5], 'ekind', '', 'emsg', '')
    finish(jid, J, 'succeeded', now)
    result = { 'succeeded' }
  end
elseif fault then
  result = node_fault(jid, J, T, ARGV[5], max_faults, base, maxd, jitter, now)
else
  redis.call('HSET', KEYS[2], 'ekind', kind, 'emsg', ARGV[5])
  result = retry_or_fail(jid, J, T, kind == 'agent_error' or kind == 'trap', base, maxd, jitter, now)
end
-- Workers waiting for work are woken only if the tenant has a job ready.
if refresh(t, T, P) then wake() end
return result
