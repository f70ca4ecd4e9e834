-- SUBMIT: accept jobs for a tenant, idempotently; one call takes one job or
-- a batch of them (each decided as if submitted alone, in order).
--
-- KEYS[1]  shard anchor `{prefix:sN}:anchor` (all other keys derive from its tag)
-- KEYS[2]  tenant hash          KEYS[1]:t:<tenant>
-- then for each job i:
-- KEYS[1 + 2i]  job hash              KEYS[1]:j:<job>
-- KEYS[2 + 2i]  idempotency string    KEYS[1]:idem:<tenant>:<sha256(key)>
-- ARGV[1]  tenant id            ARGV[2]  idempotency TTL (s)
-- ARGV[3..6] prices: credits/Mfuel, credits/GPU-s, GPU slot weight, credits/slot-s
-- ARGV[7]  N, the number of jobs; then for each job i, 15 fields from
--          ARGV[8 + 15 * (i - 1)]:
--   new job id (ULID), component digest, input, agent id or '', contexts
--   (JSON [[name, digest], ...]), gpus, max_attempts (>= 1), timeout_ms or '',
--   fuel or '', delay_ms, sha256 of the body ('' without an idempotency key),
--   callback_url or '' (checked by the API against the egress rules),
--   credits each attempt reserves for outgoing HTTP requests (0 for a
--   component that makes none; stored as the job's `egress_r`),
--   tokens its attempts may spend on inference (0 for a component that
--   calls no model; stored as `max_tokens`), and the credits each attempt
--   reserves for them (stored as `tokens_r`)
-- Returns: an array with one answer per job, in order, each
--          {'created', id, state} | {'exists', id, state} | {'conflict'}
--          | {'no_tenant'} | {'queue_full'} | {'credits', reservation, balance}
-- Errors:  malformed arguments (nothing written, for any job).
local t, ttl = ARGV[1], uint(ARGV[2])
local P = prices(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
local count = uint(ARGV[7])
local STRIDE = 15
if t == '' or ttl == nil or P == nil or count == nil or count < 1
  or #ARGV ~= 7 + STRIDE * count or #KEYS ~= 3 + 2 * count then
  return fail('malformed arguments')
end
if KEYS[2] ~= tkey(t) then return fail('keys do not match arguments') end

-- Every job's arguments are checked before anything is written.
local jobs = {}
for i = 1, count do
  local a = 7 + STRIDE * (i - 1)
  local x = { jid = ARGV[a + 1], component = ARGV[a + 2], input = ARGV[a + 3],
    agent = ARGV[a + 4], contexts = ARGV[a + 5], gpus = uint(ARGV[a + 6]),
    max_attempts = uint(ARGV[a + 7]), timeout_ms = ARGV[a + 8], fuel = ARGV[a + 9],
    delay = uint(ARGV[a + 10]), body_hash = ARGV[a + 11], callback = ARGV[a + 12],
    http_r = uint(ARGV[a + 13]), max_tokens = uint(ARGV[a + 14]), tokens_r = uint(ARGV[a + 15]),
    key = KEYS[1 + 2 * i], idem = KEYS[2 + 2 * i] }
  if x.jid == '' or x.component == '' then return fail('empty tenant, job or component') end
  if x.gpus == nil or x.max_attempts == nil or x.max_attempts < 1 or x.delay == nil
    or x.http_r == nil or x.max_tokens == nil or x.tokens_r == nil then
    return fail('malformed numeric argument')
  end
  if x.timeout_ms ~= '' and uint(x.timeout_ms) == nil then return fail('malformed timeout_ms') end
  if x.fuel ~= '' and uint(x.fuel) == nil then return fail('malformed fuel') end
  if x.key ~= jkey(x.jid) then return fail('keys do not match arguments') end
  -- A ULID drawn twice: never expected; refused rather than overwritten.
  if redis.call('EXISTS', x.key) == 1 then return fail('job id already used') end
  jobs[i] = x
end

local out = {}
local T = tenant_meta(KEYS[2])
if next(T) == nil then
  for i = 1, count do out[i] = { 'no_tenant' } end
  return out
end
local now = now_ms()
local now_s = I(now)

local function submit_one(x)
  local jid = x.jid
  if x.body_hash ~= '' then
    local prev = redis.call('GET', x.idem)
    if prev then
      local sep = string.find(prev, '\n', 1, true)
      local h, old = string.sub(prev, 1, sep - 1), string.sub(prev, sep + 1)
      if h ~= x.body_hash then return { 'conflict' } end
      return { 'exists', old, redis.call('HGET', jkey(old), 'state') or 'queued' }
    end
  end

  -- max_queued bounds admission of new jobs only. A job already accepted is
  -- never refused on its way back (retry, RELEASE, state conflict, REAP), so
  -- `queued` may pass max_queued, but queued + running stays within
  -- max_queued + max_running: only SUBMIT adds, and only below max_queued.
  if n(T, 'queued') >= n(T, 'max_queued') then return { 'queue_full' } end
  local J = { fuel = x.fuel, timeout_ms = x.timeout_ms, tenant = t, egress_r = x.http_r,
    tokens_r = x.tokens_r }
  local fuel, timeout = effective(J, T)
  local r = reservation(fuel, timeout, x.gpus, P, J)
  local balance = n(T, 'granted') - n(T, 'settled')
  if balance < r then return { 'credits', r, balance } end

  -- The job's hash is written once, with its state (and, ready at once, its
  -- stream entry).
  -- Only what is set: a field a job does not carry reads as 0 or '' (the
  -- scripts' `n` and `or ''`, the Rust side's readers), so a plain job is a
  -- small hash: fewer bytes to write, keep and log to the AOF.
  local fields = { 'tenant', t, 'component', x.component, 'input', x.input,
    'contexts', x.contexts, 'max_attempts', I(x.max_attempts), 'created', now_s }
  local function opt(name, v)
    if v ~= '' then
      fields[#fields + 1] = name
      fields[#fields + 1] = v
    end
  end
  opt('agent_id', x.agent)
  opt('timeout_ms', x.timeout_ms)
  opt('fuel', x.fuel)
  opt('callback', x.callback)
  if x.gpus > 0 then opt('gpus', I(x.gpus)) end
  if x.http_r > 0 then opt('egress_r', I(x.http_r)) end
  if x.max_tokens > 0 then opt('max_tokens', I(x.max_tokens)) end
  if x.tokens_r > 0 then opt('tokens_r', I(x.tokens_r)) end
  local state = 'queued'
  if x.delay > 0 then
    state = 'delayed'
    redis.call('ZADD', DELAYED, I(now + x.delay), jid)
  else
    local sid = redis.call('XADD', qkey(t), '*', 'j', jid)
    fields[#fields + 1] = 'sid'
    fields[#fields + 1] = sid
  end
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = state
  redis.call('HSET', x.key, unpack(fields))
  redis.call('ZADD', jobskey(t), '0', jid)
  J.state = ''
  move_state(jid, J, state)
  T.queued = n(T, 'queued') + 1
  if x.body_hash ~= '' then
    redis.call('SET', x.idem, x.body_hash .. '\n' .. jid, 'EX', math.max(ttl, 1))
  end
  return { 'created', jid, state }
end

local created = 0
for i, x in ipairs(jobs) do
  out[i] = submit_one(x)
  if out[i][1] == 'created' then created = created + 1 end
end
if created > 0 then
  redis.call('HINCRBY', KEYS[2], 'queued', created)
  -- An eligible tenant (parked = '') stays eligible when jobs join the tail
  -- of its queue: its head, running count and credits are unchanged, so
  -- there is nothing to re-decide and no one to wake. Otherwise (parked
  -- `empty`, or any other reason) re-decide.
  if (T.parked or '') ~= '' then
    if refresh(t, T, P) then wake() end
  end
end
return out
