-- lib.lua: helpers shared by every script. The Rust side
-- (`src/control/scripts.rs`) loads this file and the scripts as one Redis
-- function library: this file first, defined once per node, then each
-- script as the body of a function `run_<script>(KEYS, ARGV)`, registered
-- as `agentplane_<hash>_<script>` and called with FCALL after `enter`
-- (below). A call is still one atomic script.
--
-- Conventions shared by all scripts:
--   KEYS[1] is the shard's anchor, e.g. `{ap:s0}:anchor`: a key that always
--   exists where the shard's data is, so a cluster routes the script to that
--   node even while the slot migrates (a tag that is no key made a migrating
--   node answer ASK or TRYAGAIN and sent CLAIM to a node holding half the
--   data). Every key a script touches is `{ap:s0}:` .. suffix, so all of them
--   hash to that one slot (the same script runs unchanged on a single Redis
--   and on a Redis Cluster).
--   The last key of every call is `{ap:s0}:absent`, a key that never
--   exists. A Redis Cluster runs no command while its slot migrates unless
--   every declared key is present on one node (the source answers ASK, the
--   target TRYAGAIN), so no script ever runs on a shard split between two
--   nodes: it would read half the data, or fail part-way on a key already
--   moved, after some of its writes. The Rust side retries until the move
--   is done. The gate (`enter`) refuses a call that does not declare it.
--   The anchor's value pauses the shard: anything but 'ready' (an operator
--   sets 'moving' before a slot migration, see docs/OPERATIONS.md) makes
--   every script refuse with a TRYAGAIN error before it reads or writes
--   anything else; the Rust side retries TRYAGAIN with backoff.
--   (Script headers write a shard key as `KEYS[1]:suffix`, meaning the
--   shard's tag followed by the suffix: `{ap:s0}:suffix`.)
--   Expected outcomes are answered as arrays whose first element is a status
--   word ('ok', 'lost', 'exists', ...). Malformed arguments raise an error
--   (`error_reply`) before anything is written.

-- The shard's tag (`{ap:s0}:`, the separator included) and the shard's
-- own keys: set by `enter` at the start of every call, from KEYS[1] (which
-- may also be a bare tag; the anchor is still checked).
local B, ANCHOR
local GROUP = 'g'

local function tkey(t) return B .. 't:' .. t end
local function jkey(j) return B .. 'j:' .. j end
local function qkey(t) return B .. 'q:' .. t end
local function ledgerkey(t) return B .. 'ledger:' .. t end
local function jobskey(t) return B .. 'jobs:' .. t end
local function statekey(t, s) return B .. 'js:' .. t .. ':' .. s end
local function agentkey(t, a) return B .. 'agent:' .. t .. ':' .. a end
-- A large agent state, one key per committed version, under its tenant and
-- agent: no two tenants or agents ever share one, and FINALIZE deletes the
-- superseded version in the same step that commits the next.
local function stateblobkey(t, a, v) return B .. 'state:' .. t .. ':' .. a .. ':' .. v end
local ACT_CPU   -- act:cpu, eligible tenants whose next job needs no GPU
local ACT_GPU   -- act:gpu, eligible tenants whose next job needs GPUs
local VCLOCK    -- vclock
local FENCE     -- fence
local DELAYED   -- delayed
local LEASES    -- leases
local WAKE      -- wake
local DONE      -- done, finished jobs by finish time, for RETAIN
local HOOKS     -- hooks, callbacks owed, by due time (lua/hooks.lua)

-- The shard's virtual clock (see CLAIM), read at most once per call.
local vclock_cached = nil
local function vclock()
  if vclock_cached == nil then
    vclock_cached = tonumber(redis.call('GET', VCLOCK) or 0) or 0
  end
  return vclock_cached
end
-- Moved in the call's copy; written once, by `flush_vclock` at the end
-- of the call (CLAIM advances it at every job it serves).
local vclock_moved = false
local function advance_vclock(v)
  if v > vclock() then
    vclock_cached = v
    vclock_moved = true
  end
end
local function flush_vclock()
  if vclock_moved then
    redis.call('SET', VCLOCK, vclock_cached)
    vclock_moved = false
  end
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(msg)
  return redis.error_reply('ERR agentplane: ' .. msg)
end

-- The largest integer a Lua number (a double) holds exactly. Every count
-- and amount the scripts keep stays within +-MAX_INT.
local MAX_INT = 9007199254740991

-- A non-negative integer argument within MAX_INT, or nil.
local function uint(v)
  local n = tonumber(v)
  if n == nil or n < 0 or n ~= math.floor(n) or n > MAX_INT then return nil end
  return n
end

local function int(v)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n > MAX_INT or n < -MAX_INT then return nil end
  return n
end

-- An integer as the scripts store it: plain digits, always. Lua's own
-- tostring writes 10^14 as `1e+14`, which integer readers misparse. Raises
-- on a non-integer or out-of-range value; callers validate their inputs
-- before writing, so this is a last guard, not a path.
local function I(x)
  if type(x) ~= 'number' or x ~= math.floor(x) or x > MAX_INT or x < -MAX_INT then
    error('agentplane: not an exact integer: ' .. tostring(x))
  end
  return string.format('%d', x)
end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

-- A job's fields as the scripts read them: one HMGET of the fields below,
-- never the bulky ones (a job's input may be 1 MiB, and its output and
-- error message large too; HGETALL copied them into Lua on every read, so a
-- PROMOTE or CLAIM batch over such jobs held Redis for seconds). CLAIM
-- reads the input once, by itself. JOB_FIELDS must name every field a
-- script reads from a job table (`J.x`, `n(J, 'x')`): a Rust unit test
-- (`control::scripts`) checks the scripts against it, so a field added
-- later is never silently missing. Missing fields are nil, as in HGETALL.
local JOB_FIELDS = { 'state', 'tenant', 'sid', 'agent_id', 'gpus', 'worker', 'attempts',
  'counted', 'token', 'cancel', 'timeout_ms', 'reserved', 'max_attempts', 'lease_until',
  'fuel', 'u_wall', 'u_fuel', 'u_credits', 'sver', 'started', 'releases', 'faults', 'est',
  'cw', 'contexts', 'conflicts', 'component', 'callback', 'egress_r', 'u_http_req',
  'u_http_bytes', 'tokens_r' }
-- The numeric ones among them (counts, tokens, money, times) are numbers
-- in the table, converted once here rather than at each read (`n`); the
-- table is built in one constructor, sized once, in JOB_FIELDS' order (the
-- unit test checks the order). A field the job lacks is nil.
local function job_meta(key)
  local v = redis.call('HMGET', key, unpack(JOB_FIELDS))
  return { state = v[1] or nil, tenant = v[2] or nil, sid = v[3] or nil, agent_id = v[4] or nil,
    gpus = tonumber(v[5]), worker = v[6] or nil, attempts = tonumber(v[7]),
    counted = tonumber(v[8]), token = tonumber(v[9]), cancel = v[10] or nil,
    timeout_ms = v[11] or nil, reserved = tonumber(v[12]), max_attempts = tonumber(v[13]),
    lease_until = tonumber(v[14]), fuel = v[15] or nil, u_wall = tonumber(v[16]),
    u_fuel = tonumber(v[17]), u_credits = tonumber(v[18]), sver = tonumber(v[19]),
    started = v[20] or nil, releases = tonumber(v[21]), faults = tonumber(v[22]),
    est = tonumber(v[23]), cw = tonumber(v[24]), contexts = v[25] or nil,
    conflicts = tonumber(v[26]), component = v[27] or nil, callback = v[28] or nil,
    egress_r = tonumber(v[29]), u_http_req = tonumber(v[30]), u_http_bytes = tonumber(v[31]),
    tokens_r = tonumber(v[32]) }
end

-- A tenant's fields as the hot scripts read them: one HMGET of the fields
-- below (never the checkpoint, byte counters or token hash), counters,
-- limits and fair-share figures as numbers (converted once, as
-- `job_meta` does), the rest as strings; built in one table constructor,
-- sized once. TENANT_FIELDS must name every field a script reads from a
-- tenant table (`T.x`, `n(T, 'x')`), in the constructor's order: a Rust
-- unit test (`control::scripts`) checks both. A tenant that does not exist
-- (no `weight`, which every tenant has) reads as an empty table.
local TENANT_FIELDS = { 'granted', 'settled', 'reserved', 'running', 'gpus', 'queued',
  'max_running', 'max_queued', 'max_gpus', 'fuel', 'timeout_ms', 'memory_bytes', 'weight',
  'vtime', 'avg_ms', 'parked', 'agpus', 'qlast', 'egress' }
local function tenant_meta(key)
  local v = redis.call('HMGET', key, unpack(TENANT_FIELDS))
  if not v[13] then return {} end
  return { granted = tonumber(v[1]), settled = tonumber(v[2]), reserved = tonumber(v[3]),
    running = tonumber(v[4]), gpus = tonumber(v[5]), queued = tonumber(v[6]),
    max_running = tonumber(v[7]), max_queued = tonumber(v[8]), max_gpus = tonumber(v[9]),
    fuel = tonumber(v[10]), timeout_ms = tonumber(v[11]), memory_bytes = tonumber(v[12]),
    weight = tonumber(v[13]), vtime = tonumber(v[14]), avg_ms = tonumber(v[15]),
    parked = v[16] or nil, agpus = v[17] or nil, qlast = v[18] or nil, egress = v[19] or nil }
end

-- Tenant tables read by this call's FINALIZE and CLAIM (tenant id ->
-- `tenant_meta` table, kept equal to the hash by every write): a FINALIZE
-- that claims hands CLAIM the tenants it already read. Reset by `enter`.
local call_tenants = {}

local function n(h, field)
  return tonumber(h[field] or 0) or 0
end

-- Prices travel with each call (ARGV), so every script agrees with the
-- process configuration without a round trip.
-- P = {fuel = credits/Mfuel, gpu = credits/GPU-s, gpuw = GPU slot weight,
--      slot = credits/slot-s}
--
-- A job pays for its fuel and for the wall time it holds a slot, so a guest
-- that parks in a host call until its deadline still pays for the capacity
-- it kept from everyone else. Slot-time weighs GPUs as fair share does
-- (one slot plus gpuw per GPU); each GPU also costs its own GPU-second price:
--   charge = ceil(fuel * fuel_price / 10^6)
--          + ceil(wall_ms * (slot_price * (1 + gpus * gpuw) + gpus * gpu_price) / 1000)
-- All integers; each term rounds up once, so a run is never billed less
-- than it used.
local function charge(fuel, wall_ms, gpus, P)
  return math.ceil(fuel * P.fuel / 1000000)
    + math.ceil(wall_ms * (P.slot * (1 + gpus * P.gpuw) + gpus * P.gpu) / 1000)
end

-- The worst case of an attempt, reserved at CLAIM (and checked at SUBMIT):
-- all its fuel and its whole timeout; for a job whose component can make
-- outgoing HTTP requests, the price of its whole egress budget
-- (`egress_r`); for one whose component calls the node's models, the price
-- of its whole token allowance at the dearest granted rate (`tokens_r`).
-- Both are fixed at SUBMIT; the host lets no run spend more.
local function reservation(fuel, timeout_ms, gpus, P, J)
  return charge(fuel, timeout_ms, gpus, P) + n(J, 'egress_r') + n(J, 'tokens_r')
end

local function effective(J, T)
  local fuel = n(T, 'fuel')
  if (J.fuel or '') ~= '' then fuel = math.min(fuel, tonumber(J.fuel)) end
  local timeout = n(T, 'timeout_ms')
  if (J.timeout_ms or '') ~= '' then timeout = math.min(timeout, tonumber(J.timeout_ms)) end
  return fuel, timeout, n(T, 'memory_bytes')
end

-- One entry of tenant t's ledger, with its balance and reservation after
-- it. `released` (a settle's only): the part of the attempt's reservation
-- the settle handed back uncharged, so one entry ends an attempt (reserve
-- = settle amount + released, or a `release` of it all for an attempt that
-- was not the tenant's to pay).
local function ledger(t, op, job, attempt, amount, T, released)
  if released ~= nil and released > 0 then
    redis.call('XADD', ledgerkey(t), '*', 'op', op, 'job', job, 'attempt', I(attempt),
      'amount', I(amount), 'released', I(released),
      'balance', I(n(T, 'granted') - n(T, 'settled')),
      'reserved', I(n(T, 'reserved')))
  else
    redis.call('XADD', ledgerkey(t), '*', 'op', op, 'job', job, 'attempt', I(attempt),
      'amount', I(amount),
      'balance', I(n(T, 'granted') - n(T, 'settled')),
      'reserved', I(n(T, 'reserved')))
  end
  -- `ledgers`: tenant -> ms of its oldest unfolded entry, so RETAIN finds
  -- every ledger with entries past the retention (a tenant with only grants,
  -- or only live jobs, included) without scanning tenants. Set once (the
  -- oldest entry stays oldest); RETAIN moves it on as it folds. A ledger
  -- written before this index existed is entered at its first entry.
  -- Checked once per tenant per call (`T._indexed`): nothing in a script
  -- takes a tenant out of the index but RETAIN, which writes no entry.
  if T._indexed then return end
  local idx = B .. 'ledgers'
  if not redis.call('ZSCORE', idx, t) then
    local first = redis.call('XRANGE', ledgerkey(t), '-', '+', 'COUNT', 1)[1][1]
    redis.call('ZADD', idx, string.match(first, '^(%d+)'), t)
  end
  T._indexed = true
end

-- Moves a job between the per-state indexes; the caller writes `state`
-- into the job hash in its own HSET (one write per job, not two).
local function move_state(jid, J, state)
  local t = J.tenant
  if J.state ~= nil and J.state ~= '' then
    redis.call('ZREM', statekey(t, J.state), jid)
  end
  redis.call('ZADD', statekey(t, state), '0', jid)
  J.state = state
end

-- Moves a job between the per-state indexes and records the new state.
local function set_state(jid, J, state)
  move_state(jid, J, state)
  redis.call('HSET', jkey(jid), 'state', state)
end

-- The next undelivered entry of a tenant's stream: entry id and job id.
local function head(t, T)
  local last = T.qlast
  if last == nil or last == '' then last = '0-0' end
  local e = redis.call('XRANGE', qkey(t), '(' .. last, '+', 'COUNT', 1)
  if #e == 0 then return nil, nil end
  return e[1][1], e[1][2][2]
end

-- GPU tenants are also bucketed by the GPUs their next job needs
-- (`act:gpu:<g>`, scored by virtual time; `act:gpu:n` lists the non-empty
-- buckets), so CLAIM finds the lowest-vtime tenant whose job fits a worker's
-- free GPUs in O(buckets * log n), however many tenants wait for more GPUs
-- than that worker has. `agpus` in the tenant hash names its bucket.
local GBUCKETS -- act:gpu:n
local function gbucket(g) return B .. 'act:gpu:' .. g end

-- Takes tenant t out of every active set (it stays parked until refresh).
local function deactivate(t, T)
  redis.call('ZREM', ACT_CPU, t)
  redis.call('ZREM', ACT_GPU, t)
  local old = T.agpus or ''
  if old ~= '' then
    redis.call('ZREM', gbucket(old), t)
    if redis.call('ZCARD', gbucket(old)) == 0 then redis.call('ZREM', GBUCKETS, old) end
    redis.call('HSET', tkey(t), 'agpus', '')
    T.agpus = ''
  end
end

-- Why a queued job can never run as things stand, or nil: SUBMIT would
-- refuse it now. An admin lowered max_gpus below what it needs, or the
-- tenant's whole balance (not only its free part) fell below its
-- reservation; running jobs only lower the balance further, so without a
-- grant it would block its tenant's queue forever.
local function never_runs(J, T, P)
  local g = n(J, 'gpus')
  if g > n(T, 'max_gpus') then
    return 'the job needs ' .. g .. ' GPUs but its tenant may hold at most '
      .. n(T, 'max_gpus') .. ' (max_gpus)'
  end
  local fuel, timeout = effective(J, T)
  local r = reservation(fuel, timeout, g, P, J)
  local balance = n(T, 'granted') - n(T, 'settled')
  if r > balance then
    return 'the job reserves ' .. string.format('%d', r) .. ' credits but its tenant\'s balance is '
      .. string.format('%d', balance) .. '; grant credits and submit it again'
  end
  return nil
end

-- `fields`: more job fields to write in the same HSET (flat name, value).
local function finish(jid, J, state, now, fields)
  move_state(jid, J, state)
  local now_s = I(now)
  local f = { 'state', state, 'finished', now_s }
  for _, x in ipairs(fields or {}) do f[#f + 1] = x end
  redis.call('HSET', jkey(jid), unpack(f))
  -- RETAIN removes it (with its log and index entries) after the retention.
  redis.call('ZADD', DONE, now_s, jid)
  -- A job with a `callback_url` is owed a delivery (lua/hooks.lua).
  if (J.callback or '') ~= '' then redis.call('ZADD', HOOKS, now_s, jid) end
end

-- Ends a queued job that can never run: `failed` with kind `unschedulable`,
-- its stream entry (never delivered) deleted, nothing charged; finished as
-- every job is (`finish`: retention, and its callback is owed).
local function fail_unschedulable(t, T, sid, jid, J, msg)
  redis.call('XDEL', qkey(t), sid)
  finish(jid, J, 'failed', now_ms(), { 'ekind', 'unschedulable', 'emsg', msg, 'sid', '' })
  T.queued = n(T, 'queued') - 1
  redis.call('HSET', tkey(t), 'queued', I(T.queued))
end

-- Impossible heads failed per refresh: bounds one script's work when an
-- admin change strands a long queue (a CLAIM that meets the tenant again
-- fails the next batch).
local UNSCHEDULABLE_BATCH = 32

-- Moves eligible tenant t, staying in its set (and GPU bucket, `agpus`),
-- to virtual time v.
local function rescore(t, T, v)
  if (T.agpus or '') ~= '' then
    redis.call('ZADD', ACT_GPU, v, t)
    redis.call('ZADD', gbucket(T.agpus), v, t)
  else
    redis.call('ZADD', ACT_CPU, v, t)
  end
  T._vmoved = nil
end

-- Re-decides whether tenant t may be claimed from: it has a ready job, is
-- below max_running and max_gpus for that job, and its free credits cover the
-- job's reservation. Eligible tenants sit in one of the two active sets
-- scored by virtual time; all others are parked (in neither set) so CLAIM
-- never rescans them. A tenant that becomes eligible again starts no earlier
-- than the shard's virtual clock: idle time banks nothing. A head job that
-- can never run fails here (`never_runs`), so it cannot block the tenant.
local function refresh(t, T, P, served)
  local reason = ''
  local set = nil
  local g = 0
  local stranded = true
  -- The head examined (answered, so CLAIM can take it without reading it again).
  local head_sid, head_jid, head_J = nil, nil, nil
  for _ = 1, UNSCHEDULABLE_BATCH do
    local sid, jid = head(t, T)
    if sid == nil then
      reason = 'empty'
      stranded = false
      break
    end
    local J = job_meta(jkey(jid))
    local why = (J.state == 'queued') and never_runs(J, T, P) or nil
    if why then
      fail_unschedulable(t, T, sid, jid, J, why)
    else
      stranded = false
      head_sid, head_jid, head_J = sid, jid, J
      g = n(J, 'gpus')
      if n(T, 'running') >= n(T, 'max_running') then
        reason = 'max_running'
      else
        local fuel, timeout = effective(J, T)
        local r = reservation(fuel, timeout, g, P, J)
        if n(T, 'gpus') + g > n(T, 'max_gpus') then
          reason = 'max_gpus'
        elseif n(T, 'granted') - n(T, 'settled') - n(T, 'reserved') < r then
          reason = 'credits'
        elseif g > 0 then
          set = ACT_GPU
        else
          set = ACT_CPU
        end
      end
      break
    end
  end
  if stranded then
    -- More impossible heads than one batch: stay eligible, so the next
    -- CLAIM that picks this tenant comes back here and fails the next batch.
    set, g = ACT_CPU, 0
  end
  local bucket = (set == ACT_GPU) and tostring(g) or ''
  -- Where t is: `served` names the set CLAIM just took it from (then it is
  -- there, and is placed anew at its advanced virtual time, as a tenant
  -- coming back is); otherwise ask Redis.
  local inset = false
  if set ~= nil and (T.agpus or '') == bucket then
    if served ~= nil then
      inset = served == set
    else
      inset = redis.call('ZSCORE', set, t) ~= false
    end
  end
  if inset then
    -- Staying: re-score when the virtual time moved in this call
    -- (`T._vmoved`, set by CLAIM and `correct_vtime`).
    local v = n(T, 'vtime')
    if served ~= nil then
      v = math.max(v, vclock())
      if v ~= n(T, 'vtime') then
        T.vtime = v
        redis.call('HSET', tkey(t), 'vtime', v)
      end
    end
    if T._vmoved or served ~= nil then rescore(t, T, v) end
  else
    -- Parked, or moving between sets or buckets: start from no set. The
    -- score carries over a move (a tenant keeps its place in line; an
    -- active tenant's score is its virtual time), but not for the tenant
    -- CLAIM just served, which is placed as one coming back.
    local kept = nil
    if set ~= nil and served == nil
      and (redis.call('ZSCORE', ACT_CPU, t) or redis.call('ZSCORE', ACT_GPU, t)) then
      kept = n(T, 'vtime')
    end
    deactivate(t, T)
    if set ~= nil then
      local v = kept
      if v == nil then
        v = math.max(n(T, 'vtime'), vclock())
        T.vtime = v
        redis.call('HSET', tkey(t), 'vtime', v)
      end
      redis.call('ZADD', set, v, t)
      if set == ACT_GPU then
        redis.call('ZADD', gbucket(bucket), v, t)
        redis.call('ZADD', GBUCKETS, g, bucket)
        redis.call('HSET', tkey(t), 'agpus', bucket)
        T.agpus = bucket
      end
    end
  end
  if (T.parked or '') ~= reason then
    redis.call('HSET', tkey(t), 'parked', reason)
    T.parked = reason
  end
  T._vmoved = nil
  return set ~= nil, head_sid, head_jid, head_J
end

-- Wakes waiting workers (a bounded blocking list: a lost signal only costs
-- one poll interval).
local function wake()
  redis.call('LPUSH', WAKE, '1')
  redis.call('LTRIM', WAKE, 0, 63)
end

local function prices(a, b, c, d)
  local P = { fuel = uint(a), gpu = uint(b), gpuw = uint(c), slot = uint(d) }
  if P.fuel == nil or P.gpu == nil or P.gpuw == nil or P.slot == nil then return nil end
  return P
end

-- Exponential backoff with jitter in [50%, 100%] of the step.
local function backoff(attempt, base, maxd, jitter)
  local d = base * (2 ^ math.max(attempt - 1, 0))
  if d > maxd then d = maxd end
  return math.floor(d * (0.5 + 0.5 * (jitter % 1000) / 1000))
end

-- Moves the tenant's `queued` counter (queued + delayed jobs) by d, in
-- Redis and in the caller's copy T, which later decisions read.
local function add_queued(t, T, d)
  redis.call('HINCRBY', tkey(t), 'queued', d)
  T.queued = n(T, 'queued') + d
end

-- Puts a job whose attempt ended back into the delayed queue.
local function to_delayed(jid, J, T, due)
  set_state(jid, J, 'delayed')
  redis.call('ZADD', DELAYED, I(due), jid)
  add_queued(J.tenant, T, 1)
end

-- Appends a job to its tenant's ready stream.
local function to_ready(jid, J, T)
  local sid = redis.call('XADD', qkey(J.tenant), '*', 'j', jid)
  move_state(jid, J, 'queued')
  redis.call('HSET', jkey(jid), 'sid', sid, 'state', 'queued')
end

-- Puts a job back at the end of its tenant's ready stream (a job that is
-- neither queued nor delayed now, so it counts as queued again).
local function requeue(jid, J, T)
  to_ready(jid, J, T)
  add_queued(J.tenant, T, 1)
end

-- A consumer goes from a tenant's group once it holds no entry: every
-- worker process has its own consumer name, so without this the groups
-- would collect one dead consumer per worker restart, forever. XREADGROUP
-- recreates it on the worker's next claim.
local function retire_consumer(t, consumer)
  if consumer == nil or consumer == '' then return end
  local p = redis.call('XPENDING', qkey(t), GROUP, '-', '+', 1, consumer)
  if #p == 0 then redis.call('XGROUP', 'DELCONSUMER', qkey(t), GROUP, consumer) end
end

-- Every consumer of t's group that holds nothing goes, at once: FINALIZE
-- calls this when the tenant has no run left on the shard (then no
-- consumer holds a running job's entry), rather than asking after each
-- worker's consumer at every call while runs go on.
local function retire_idle_consumers(t)
  local cs = redis.pcall('XINFO', 'CONSUMERS', qkey(t), GROUP)
  if type(cs) ~= 'table' or cs.err then return end
  for _, c in ipairs(cs) do
    local name, pending = nil, nil
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
    end
    if name and pending == 0 then redis.call('XGROUP', 'DELCONSUMER', qkey(t), GROUP, name) end
  end
end

-- Ends an attempt's hold on the worker: PEL entry, lease, running count,
-- GPU slots. Shared by FINALIZE, REAP and RELEASE. `tfields` and `jfields`
-- (flat name, value lists, optional) join its tenant and job HSETs, so a
-- caller writes each hash once. With `batch` (FINALIZE's, ending several
-- attempts), the tenant's counts are left in T for the caller to write once
-- per tenant (`tfields` then unused), and so is retiring the worker's
-- consumer (`retire_idle_consumers`). With `hold` (a list), the job's
-- fields are appended to it instead of written.
local function end_attempt(jid, J, T, tfields, jfields, batch, hold)
  local t = J.tenant
  if (J.sid or '') ~= '' then
    redis.call('XACK', qkey(t), GROUP, J.sid)
    redis.call('XDEL', qkey(t), J.sid)
  end
  if not batch then retire_consumer(t, J.worker) end
  redis.call('ZREM', LEASES, jid)
  local g = n(J, 'gpus')
  T.running = n(T, 'running') - 1
  T.gpus = n(T, 'gpus') - g
  -- HSET, not HINCRBY: Lua renders -0 as "-0", which HINCRBY refuses.
  if not batch then
    local tf = { 'running', I(T.running), 'gpus', I(T.gpus) }
    for _, x in ipairs(tfields or {}) do tf[#tf + 1] = x end
    redis.call('HSET', tkey(t), unpack(tf))
  end
  local jf = hold or {}
  for _, x in ipairs({ 'sid', '', 'worker', '', 'lease_until', '0' }) do jf[#jf + 1] = x end
  for _, x in ipairs(jfields or {}) do jf[#jf + 1] = x end
  -- `hold`: the caller writes these with its own next HSET of the job.
  if not hold then redis.call('HSET', jkey(jid), unpack(jf)) end
end

-- Releases the attempt's whole reservation uncharged.
local function release_reservation(jid, J, T)
  local r = n(J, 'reserved')
  if r > 0 then
    redis.call('HINCRBY', tkey(J.tenant), 'reserved', I(-r))
    T.reserved = n(T, 'reserved') - r
    ledger(J.tenant, 'release', jid, n(J, 'attempts'), r, T)
  end
  redis.call('HSET', jkey(jid), 'reserved', '0')
end

-- Attempts that count toward max_attempts. `attempts` numbers every run
-- (the ledger names runs by it, so it never goes back); `counted` leaves out
-- the runs that were not the job's to lose: handed back by a draining
-- worker, re-run on a state conflict, or stopped by a node fault. Jobs
-- written before `counted` existed count every run.
local function counted(J)
  if (J.counted or '') == '' then return n(J, 'attempts') end
  return n(J, 'counted')
end

-- A run that does not count toward max_attempts after all (handed back by
-- a draining worker, re-run on a state conflict, stopped by a node fault).
local function uncount(jid, J)
  redis.call('HSET', jkey(jid), 'counted', I(math.max(counted(J) - 1, 0)))
end

-- The one retry rule: a run that failed is retried after an exponential
-- backoff while it is of a retryable kind and the job has attempts left
-- that count toward max_attempts (`counted`); otherwise the job fails.
-- Returns the script's answer: {'retry', delay_ms} or {'failed'}.
local function retry_or_fail(jid, J, T, retryable, base, maxd, jitter, now)
  local c = counted(J)
  if retryable and c < n(J, 'max_attempts') then
    local d = backoff(c, base, maxd, jitter)
    to_delayed(jid, J, T, now + d)
    return { 'retry', d }
  end
  finish(jid, J, 'failed', now)
  return { 'failed' }
end

-- Ends the job as cancelled by its tenant: the cancel flag wins on every
-- path out of a run (FINALIZE, RELEASE, REAP) and ends a queued job at once.
local function finish_cancelled(jid, J, now)
  finish(jid, J, 'cancelled', now, { 'ekind', 'cancelled', 'emsg', 'cancelled by the tenant' })
end

-- Replaces the slot-time CLAIM charged in advance (`est` at the weight of
-- the claim, `cw`) by `actual`, and re-scores the tenant. RELEASE, REAP and
-- node faults pass 0: a run that was not the tenant's costs it no share.
-- The weight at claim, not the current one: claiming at weight 1000 and
-- correcting at weight 1 would bank priority.
-- The tenant's score follows at its next `refresh` (every caller ends with
-- one), and `deferred` leaves the HSET of `vtime` to the caller's own.
local function correct_vtime(t, J, T, actual, deferred)
  local w = n(J, 'cw')
  if w <= 0 then w = math.max(n(T, 'weight'), 1) end
  T.vtime = n(T, 'vtime') + (actual - n(J, 'est')) / w
  T._vmoved = true
  if not deferred then redis.call('HSET', tkey(t), 'vtime', T.vtime) end
end

-- A run the node could not give what it needs (the node's fault, not the
-- guest's): never charged, never counted toward max_attempts, but bounded
-- per job, so a job no node can start ends with `node_fault` instead of
-- cycling through the queue forever. The caller has already released the
-- reservation and ended the attempt. Returns the script's answer:
-- {'failed'} or {'retry', delay_ms}.
local function node_fault(jid, J, T, msg, max_faults, base, maxd, jitter, now)
  local f = n(J, 'faults') + 1
  redis.call('HSET', jkey(jid), 'faults', I(f))
  uncount(jid, J)
  if f >= max_faults then
    redis.call('HSET', jkey(jid), 'ekind', 'node_fault',
      'emsg', 'nodes failed to run this job ' .. f .. ' times; last: ' .. msg)
    finish(jid, J, 'failed', now)
    return { 'failed' }
  end
  redis.call('HSET', jkey(jid), 'ekind', 'node_fault', 'emsg', msg)
  local d = backoff(f, base, maxd, jitter)
  to_delayed(jid, J, T, now + d)
  return { 'retry', d }
end

-- Starts a call: the shard's keys from KEYS[1], this call's caches reset,
-- then the shard gate (see the header), before any script's own code.
-- Answers the error to return instead of running the script, or nil.
-- A missing anchor means a fresh (or flushed) Redis: while a slot migrates
-- the anchor is on exactly one node and a cluster routes this call there,
-- so creating it here never forks it.
local function enter(KEYS)
  B = string.match(KEYS[1], '^{[^}]*}') .. ':'
  ANCHOR = B .. 'anchor'
  ACT_CPU, ACT_GPU, GBUCKETS = B .. 'act:cpu', B .. 'act:gpu', B .. 'act:gpu:n'
  VCLOCK, FENCE, DELAYED, LEASES = B .. 'vclock', B .. 'fence', B .. 'delayed', B .. 'leases'
  WAKE, DONE, HOOKS = B .. 'wake', B .. 'done', B .. 'hooks'
  vclock_cached, vclock_moved, call_tenants = nil, false, {}
  if KEYS[#KEYS] ~= B .. 'absent' then
    return redis.error_reply('ERR agentplane: the last key must be ' .. B .. 'absent')
  end
  local a = redis.call('GET', ANCHOR)
  if not a then
    redis.call('SET', ANCHOR, 'ready')
  elseif a ~= 'ready' then
    return redis.error_reply('TRYAGAIN agentplane: shard ' .. B .. ' is paused (' .. a .. ')')
  end
  return nil
end
