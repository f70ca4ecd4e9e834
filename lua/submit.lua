-- SUBMIT: accept a job for a tenant, idempotently.
--
-- KEYS[1]  shard anchor `{prefix:sN}:anchor` (all other keys derive from its tag)
-- KEYS[2]  tenant hash          KEYS[1]:t:<tenant>
-- KEYS[3]  job hash             KEYS[1]:j:<job>
-- KEYS[4]  idempotency string   KEYS[1]:idem:<tenant>:<sha256(key)>
-- ARGV[1]  tenant id            ARGV[2]  new job id (ULID)
-- ARGV[3]  component digest     ARGV[4]  input
-- ARGV[5]  agent id or ''       ARGV[6]  contexts, JSON [[name, digest], ...]
-- ARGV[7]  gpus                 ARGV[8]  max_attempts (>= 1)
-- ARGV[9]  timeout_ms or ''     ARGV[10] fuel or ''
-- ARGV[11] delay_ms             ARGV[12] sha256 of the body, '' without a key
-- ARGV[13] idempotency TTL (s)  ARGV[14..17] prices: credits/Mfuel, credits/GPU-s, GPU slot weight,
--                               credits/slot-s
-- ARGV[18] callback_url or '' (checked by the API against the egress rules)
-- Returns: {'created', id, state} | {'exists', id, state} | {'conflict'}
--          | {'no_tenant'} | {'queue_full'} | {'credits', reservation, balance}
-- Errors:  malformed arguments (nothing written).
local t, jid = ARGV[1], ARGV[2]
local gpus, max_attempts, delay = uint(ARGV[7]), uint(ARGV[8]), uint(ARGV[11])
local ttl = uint(ARGV[13])
local P = prices(ARGV[14], ARGV[15], ARGV[16], ARGV[17])
if t == '' or jid == '' or ARGV[3] == '' then return fail('empty tenant, job or component') end
if gpus == nil or max_attempts == nil or max_attempts < 1 or delay == nil or ttl == nil or P == nil then
  return fail('malformed numeric argument')
end
if ARGV[9] ~= '' and uint(ARGV[9]) == nil then return fail('malformed timeout_ms') end
if ARGV[10] ~= '' and uint(ARGV[10]) == nil then return fail('malformed fuel') end
if KEYS[2] ~= tkey(t) or KEYS[3] ~= jkey(jid) then return fail('keys do not match arguments') end

local T = hgetall(KEYS[2])
if next(T) == nil then return { 'no_tenant' } end
local body_hash = ARGV[12]
if body_hash ~= '' then
  local prev = redis.call('GET', KEYS[4])
  if prev then
    local sep = string.find(prev, '\n', 1, true)
    local h, old = string.sub(prev, 1, sep - 1), string.sub(prev, sep + 1)
    if h ~= body_hash then return { 'conflict' } end
    return { 'exists', old, redis.call('HGET', jkey(old), 'state') or 'queued' }
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then return fail('job id already used') end

-- max_queued bounds admission of new jobs only. A job already accepted is
-- never refused on its way back (retry, RELEASE, state conflict, REAP), so
-- `queued` may pass max_queued, but queued + running stays within
-- max_queued + max_running: only SUBMIT adds, and only below max_queued.
if n(T, 'queued') >= n(T, 'max_queued') then return { 'queue_full' } end
local J = { fuel = ARGV[10], timeout_ms = ARGV[9], tenant = t }
local fuel, timeout = effective(J, T)
local r = reservation(fuel, timeout, gpus, P)
local balance = n(T, 'granted') - n(T, 'settled')
if balance < r then return { 'credits', r, balance } end

local now = now_ms()
redis.call('HSET', KEYS[3], 'tenant', t, 'component', ARGV[3], 'input', ARGV[4],
  'agent_id', ARGV[5], 'contexts', ARGV[6], 'gpus', I(gpus), 'max_attempts', I(max_attempts),
  'timeout_ms', ARGV[9], 'fuel', ARGV[10], 'attempts', 0, 'counted', 0, 'conflicts', 0, 'token', 0,
  'reserved', 0, 'u_fuel', 0, 'u_wall', 0, 'u_credits', 0, 'created', I(now), 'cancel', 0,
  'callback', ARGV[18] or '')
redis.call('ZADD', jobskey(t), 0, jid)
J.state = ''
if delay > 0 then
  to_delayed(jid, J, T, now + delay)
else
  requeue(jid, J, T)
end
if body_hash ~= '' then
  redis.call('SET', KEYS[4], body_hash .. '\n' .. jid, 'EX', math.max(ttl, 1))
end
-- An eligible tenant (parked = '') stays eligible when a job joins the
-- tail of its queue: its head, running count and credits are unchanged, so
-- there is nothing to re-decide and no one to wake. Otherwise (parked
-- `empty`, or any other reason) re-decide.
if (T.parked or '') ~= '' then
  if refresh(t, T, P) then wake() end
end
return { 'created', jid, J.state }
