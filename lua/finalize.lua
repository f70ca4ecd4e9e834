-- FINALIZE: settle an attempt's cost, record its outcome, release its lease.
-- Once per attempt: the fencing token must be the current one and the job
-- running, so a second FINALIZE (or a stale worker's) changes nothing.
--
-- KEYS[1]  shard tag            KEYS[2]  job hash KEYS[1]:j:<job>
-- ARGV[1]  job id               ARGV[2]  fencing token
-- ARGV[3]  outcome: 'ok' | 'failed' | 'cancelled'
-- ARGV[4]  error kind (failed)  ARGV[5]  output (ok) or error message (failed)
-- ARGV[6]  fuel used            ARGV[7]  wall ms
-- ARGV[8]  log (already bounded)
-- ARGV[9]  new state: 'none' | 'inline' | 'ptr'   ARGV[10] inline bytes or blob pointer
-- ARGV[11] retry base ms        ARGV[12] retry max ms   ARGV[13] jitter 0..999
-- ARGV[14] max state conflicts before the job fails
-- ARGV[15..17] prices (see SUBMIT)
-- Returns: {'succeeded', old_state_ptr} | {'failed'} | {'cancelled'}
--          | {'retry', delay_ms} | {'conflict'} | {'lost'}
-- Errors:  malformed arguments (nothing written).
local jid, token, outcome, kind = ARGV[1], uint(ARGV[2]), ARGV[3], ARGV[4]
local fuel, wall = uint(ARGV[6]), uint(ARGV[7])
local smode = ARGV[9]
local base, maxd, jitter, max_conflicts = uint(ARGV[11]), uint(ARGV[12]), uint(ARGV[13]), uint(ARGV[14])
local P = prices(ARGV[15], ARGV[16], ARGV[17])
local kinds = { agent_error = true, trap = true, fuel_exhausted = true, memory_limit = true, timeout = true,
  invalid_component = true, node_fault = true }
if token == nil or fuel == nil or wall == nil or base == nil or maxd == nil or jitter == nil
  or max_conflicts == nil or P == nil or KEYS[2] ~= jkey(jid) then
  return fail('malformed arguments')
end
if outcome ~= 'ok' and outcome ~= 'failed' and outcome ~= 'cancelled' then return fail('unknown outcome') end
if outcome == 'failed' and not kinds[kind] then return fail('unknown error kind') end
if smode ~= 'none' and smode ~= 'inline' and smode ~= 'ptr' then return fail('unknown state mode') end

local J = hgetall(KEYS[2])
if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
local t = J.tenant
local T = hgetall(tkey(t))
local now = now_ms()
local g = n(J, 'gpus')
local attempt = n(J, 'attempts')

-- Money: the actual cost, never above what was reserved for this attempt.
local r = n(J, 'reserved')
local cost = math.ceil(fuel * P.fuel / 1000000) + math.ceil(wall * g * P.gpu / 1000)
if cost > r then cost = r end
T.settled = n(T, 'settled') + cost
T.reserved = n(T, 'reserved') - r
redis.call('HSET', tkey(t), 'settled', T.settled, 'reserved', T.reserved)
ledger(t, 'settle', jid, attempt, cost, T)
if r - cost > 0 then ledger(t, 'release', jid, attempt, r - cost, T) end
redis.call('HSET', KEYS[2], 'reserved', 0)
redis.call('HINCRBY', KEYS[2], 'u_fuel', fuel)
redis.call('HINCRBY', KEYS[2], 'u_wall', wall)
redis.call('HINCRBY', KEYS[2], 'u_credits', cost)

end_attempt(jid, J, T)

-- Fairness: replace the claim's estimate by the actual slot-time.
local actual = wall * (1 + g * P.gpuw)
local weight = math.max(n(T, 'weight'), 1)
T.vtime = n(T, 'vtime') + (actual - n(J, 'est')) / weight
local avg = n(T, 'avg_ms')
if avg <= 0 then avg = wall else avg = avg * 0.8 + wall * 0.2 end
T.avg_ms = math.max(avg, 1)
redis.call('HSET', tkey(t), 'vtime', T.vtime, 'avg_ms', T.avg_ms)
for _, set in ipairs({ ACT_CPU, ACT_GPU }) do
  if redis.call('ZSCORE', set, t) then redis.call('ZADD', set, T.vtime, t) end
end

redis.call('SET', B .. 'log:' .. jid, ARGV[8])

local result
if outcome == 'ok' then
  local old_ptr = ''
  local conflict = false
  if (J.agent_id or '') ~= '' and smode ~= 'none' then
    local akey = agentkey(t, J.agent_id)
    local A = hgetall(akey)
    if n(A, 'version') ~= n(J, 'sver') then
      conflict = true
    else
      old_ptr = A.ptr or ''
      if smode == 'inline' then
        redis.call('HSET', akey, 'version', n(A, 'version') + 1, 'inline', ARGV[10], 'ptr', '')
      else
        redis.call('HSET', akey, 'version', n(A, 'version') + 1, 'inline', '', 'ptr', ARGV[10])
      end
    end
  end
  if conflict then
    local c = n(J, 'conflicts') + 1
    redis.call('HSET', KEYS[2], 'conflicts', c)
    if c > max_conflicts then
      redis.call('HSET', KEYS[2], 'ekind', 'agent_error',
        'emsg', 'agent state changed under this job ' .. c .. ' times; giving up')
      finish(jid, J, 'failed', now)
      result = { 'failed' }
    else
      -- The run was valid work (charged), but its state is stale: run again
      -- at once, without using up an attempt.
      redis.call('HSET', KEYS[2], 'attempts', attempt - 1)
      to_ready(jid, J, T)
      redis.call('HINCRBY', tkey(t), 'queued', 1)
      T.queued = n(T, 'queued') + 1
      result = { 'conflict' }
    end
  else
    redis.call('HSET', KEYS[2], 'output', ARGV[5], 'ekind', '', 'emsg', '')
    finish(jid, J, 'succeeded', now)
    result = { 'succeeded', old_ptr }
  end
elseif outcome == 'cancelled' or J.cancel == '1' then
  redis.call('HSET', KEYS[2], 'ekind', 'cancelled', 'emsg', 'cancelled by the tenant')
  finish(jid, J, 'cancelled', now)
  result = { 'cancelled' }
else
  redis.call('HSET', KEYS[2], 'ekind', kind, 'emsg', ARGV[5])
  local retryable = (kind == 'agent_error' or kind == 'trap')
  if retryable and attempt < n(J, 'max_attempts') then
    local d = backoff(attempt, base, maxd, jitter)
    to_delayed(jid, J, T, now + d)
    result = { 'retry', d }
  else
    finish(jid, J, 'failed', now)
    result = { 'failed' }
  end
end
refresh(t, T, P)
wake()
return result
