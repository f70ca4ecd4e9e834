-- HOOKS: the callback deliveries owed for finished jobs with a
-- `callback_url`. `finish()` in lib.lua adds the job to `hooks` (due now)
-- in the same step that ends it, so a delivery is owed durably; the API's
-- dispatcher (src/callbacks.rs) takes due ones with a lease, and either
-- removes them (`done`) or makes them due again later (`later`).
--
-- KEYS[1]  shard anchor (derived: hooks, j:<job>)
-- ARGV[1]  op: `take`, `done` or `later`
--   take   ARGV[2] most to take (1..1000)  ARGV[3] lease ms (>= 1)
--          Takes the hooks due now, oldest first, and makes each due again
--          a lease later: a dispatcher that dies mid-delivery leaves them
--          to be taken again (at least once). A hook whose job is gone is
--          dropped.
--          Returns: {job, tenant, callback_url, attempts so far, ...}
--   done   ARGV[2] job  ARGV[3] outcome (`delivered`, `failed`, `refused`)
--          ARGV[4] attempts made
--          Removes the hook; records cb_state and cb_attempts on the job.
--          Returns: {'ok'} | {'not_found'} (the hook is no longer owed)
--   later  ARGV[2] job  ARGV[3] delay ms  ARGV[4] attempts made
--          ARGV[5] state (`pending` or `retrying`)
--          Makes an owed hook due again after the delay; records cb_state
--          and cb_attempts. Returns: {'ok'} | {'not_found'}
-- Errors:  malformed arguments (nothing written).
local op = ARGV[1]
local now = now_ms()
if op == 'take' then
  local most, lease = uint(ARGV[2]), uint(ARGV[3])
  if most == nil or most < 1 or most > 1000 or lease == nil or lease < 1 then
    return fail('malformed take')
  end
  local out = {}
  for _, jid in ipairs(redis.call('ZRANGEBYSCORE', HOOKS, '-inf', now, 'LIMIT', 0, most)) do
    local f = redis.call('HMGET', jkey(jid), 'tenant', 'callback', 'cb_attempts')
    if not f[1] or not f[2] or f[2] == '' then
      redis.call('ZREM', HOOKS, jid)
    else
      redis.call('ZADD', HOOKS, now + lease, jid)
      out[#out + 1] = jid
      out[#out + 1] = f[1]
      out[#out + 1] = f[2]
      out[#out + 1] = tonumber(f[3] or 0) or 0
    end
  end
  return out
end

local jid, attempts = ARGV[2] or '', uint(ARGV[4])
if jid == '' or attempts == nil then return fail('malformed job or attempts') end
if redis.call('ZSCORE', HOOKS, jid) == false then return { 'not_found' } end
if op == 'done' then
  local outcome = ARGV[3]
  if outcome ~= 'delivered' and outcome ~= 'failed' and outcome ~= 'refused' then
    return fail('malformed outcome')
  end
  redis.call('ZREM', HOOKS, jid)
  redis.call('HSET', jkey(jid), 'cb_state', outcome, 'cb_attempts', I(attempts))
  return { 'ok' }
elseif op == 'later' then
  local delay, state = uint(ARGV[3]), ARGV[5]
  if delay == nil or (state ~= 'pending' and state ~= 'retrying') then
    return fail('malformed later')
  end
  redis.call('ZADD', HOOKS, now + delay, jid)
  redis.call('HSET', jkey(jid), 'cb_state', state, 'cb_attempts', I(attempts))
  return { 'ok' }
end
return fail('unknown op')
