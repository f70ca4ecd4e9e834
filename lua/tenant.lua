-- TENANT: create, update, or grant credits to a tenant.
--
-- KEYS[1]  shard anchor            KEYS[2]  tenant hash KEYS[1]:t:<tenant>
-- ARGV[1]  op: 'create' | 'update' | 'grant'
-- ARGV[2]  tenant id
-- ARGV[3..6] prices (see SUBMIT)
-- create: ARGV[7] token hash, ARGV[8] initial credits, then field/value pairs
--         for every config field (weight, max_running, max_queued, max_gpus,
--         fuel, memory_bytes, timeout_ms, max_component_bytes,
--         max_context_bytes, max_state_bytes): the defaults live in the Rust
--         side only (`TenantSpec`, `ControlConfig::default_limits`), so a
--         create without one of them is refused as malformed.
--         and `egress` (the tenant's `allowed_outbound_hosts`, rules one per
--         line in normal form, '' for none) and `models` (its model grants,
--         `model in out` one per line): checked by the Rust side, here only
--         bounded in size; the two fields that are not integers.
--         `max_tokens` (tokens one job may spend on inference) is optional.
-- update: field/value pairs from ARGV[7] (same fields, each optional)
-- grant:  ARGV[7] amount (may be negative); with an Idempotency-Key, KEYS[3] is the
--         grant's key S:gidem:<tenant>:<sha256(key)> (the shard's absent key is then
--         KEYS[4]) and ARGV[8] its TTL in seconds: a replay with the same amount
--         answers the first grant's balance and credits nothing, another amount
--         answers {'conflict'}
-- Returns: create {'ok'} | {'exists'}; update {'ok'} | {'not_found'};
--          grant {'ok', balance} | {'not_found'} | {'insufficient', balance, reserved}
--                | {'conflict'} (the Idempotency-Key was used with another amount)
--                | {'out_of_range'} (granted or balance would leave +-(2^53 - 1))
-- Errors:  malformed arguments, unknown or non-integer fields (nothing written).
local op, t = ARGV[1], ARGV[2]
local P = prices(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if P == nil or KEYS[2] ~= tkey(t) then return fail('malformed arguments') end
local allowed = { weight = true, max_running = true, max_queued = true, max_gpus = true,
  fuel = true, memory_bytes = true, timeout_ms = true,
  max_component_bytes = true, max_context_bytes = true, max_state_bytes = true,
  max_tokens = true }

-- Text fields and their longest value (bytes).
local text = { egress = 64 * 260, models = 64 * 110 }

local function pairs_from(i)
  local kv = {}
  if (#ARGV - i + 1) % 2 ~= 0 then return nil, 'odd field list' end
  for j = i, #ARGV, 2 do
    local f, v = ARGV[j], ARGV[j + 1]
    if text[f] then
      if #v > text[f] then return nil, 'field ' .. f .. ' is too long' end
    elseif not allowed[f] then
      return nil, 'unknown field ' .. f
    else
      v = uint(v)
      if v == nil then return nil, 'field ' .. f .. ' is not an integer in 0..2^53-1' end
      v = I(v)
    end
    kv[#kv + 1] = f
    kv[#kv + 1] = v
  end
  return kv
end

local exists = redis.call('EXISTS', KEYS[2]) == 1
if op == 'create' then
  local credits = uint(ARGV[8])
  if credits == nil then return fail('initial credits must be an integer in 0..2^53-1') end
  local kv, err = pairs_from(9)
  if kv == nil then return fail(err) end
  local given = {}
  for j = 1, #kv, 2 do given[kv[j]] = true end
  for f in pairs(allowed) do
    if not given[f] then return fail('create without ' .. f) end
  end
  if exists then return { 'exists' } end
  -- Counters and scheduling state start here; the configuration is kv.
  redis.call('HSET', KEYS[2], 'token_hash', ARGV[7], 'running', 0, 'gpus', 0, 'queued', 0,
    'granted', 0, 'settled', 0, 'reserved', 0, 'vtime', 0, 'avg_ms', 1000, 'parked', 'empty',
    'qlast', '0-0', 'created', now_ms(), unpack(kv))
  redis.call('XGROUP', 'CREATE', qkey(t), GROUP, '0', 'MKSTREAM')
  local T = hgetall(KEYS[2])
  if credits > 0 then
    redis.call('HSET', KEYS[2], 'granted', I(credits))
    T.granted = credits
    ledger(t, 'grant', '', 0, credits, T)
  end
  return { 'ok' }
elseif op == 'update' then
  local kv, err = pairs_from(7)
  if kv == nil then return fail(err) end
  if not exists then return { 'not_found' } end
  if #kv > 0 then redis.call('HSET', KEYS[2], unpack(kv)) end
  local T = hgetall(KEYS[2])
  -- New quotas or weights take effect now: re-decide parking.
  refresh(t, T, P)
  wake()
  return { 'ok' }
elseif op == 'grant' then
  local amount = int(ARGV[7])
  if amount == nil then return fail('amount must be an integer') end
  local idem, ttl = nil, nil
  if #KEYS == 4 then
    idem, ttl = KEYS[3], uint(ARGV[8])
    if string.sub(idem, 1, #B + 6 + #t + 1) ~= B .. 'gidem:' .. t .. ':' or ttl == nil or ttl < 1 then
      return fail('malformed idempotency key or ttl')
    end
  end
  if not exists then return { 'not_found' } end
  if idem then
    -- `amount \n balance` of the first grant under this key.
    local prev = redis.call('GET', idem)
    if prev then
      local a, b = string.match(prev, '^(%-?%d+)\n(%-?%d+)$')
      if a ~= I(amount) then return { 'conflict' } end
      return { 'ok', tonumber(b) }
    end
  end
  local T = hgetall(KEYS[2])
  local granted = n(T, 'granted') + amount
  local balance = granted - n(T, 'settled')
  if math.abs(granted) > MAX_INT or math.abs(balance) > MAX_INT then return { 'out_of_range' } end
  if balance < n(T, 'reserved') then
    return { 'insufficient', n(T, 'granted') - n(T, 'settled'), n(T, 'reserved') }
  end
  T.granted = granted
  redis.call('HSET', KEYS[2], 'granted', I(T.granted))
  ledger(t, 'grant', '', 0, amount, T)
  if idem then redis.call('SET', idem, I(amount) .. '\n' .. I(balance), 'EX', ttl) end
  if refresh(t, T, P) then wake() end
  return { 'ok', balance }
end
return fail('unknown op')
