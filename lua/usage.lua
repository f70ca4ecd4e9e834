-- USAGE: charge what a tenant stores (component and context uploads, agent
-- states) against its byte quotas, before it is stored. Without this a
-- tenant could fill Redis with uploads and states, which are never deleted.
--
-- Each item is counted once at its latest size: the hash `usage:<tenant>`
-- maps `<kind>:<item>` to bytes, and the tenant hash keeps the total in
-- `<kind>_bytes`. Uploading the same item again charges only the
-- difference (a re-upload of a component charges nothing; a smaller
-- context or state gives bytes back).
--
-- KEYS[1]  shard anchor            KEYS[2]  tenant hash KEYS[1]:t:<tenant>
-- ARGV[1]  tenant id
-- ARGV[2]  kind: 'component' | 'context' | 'state'
-- ARGV[3]  item: component digest, context name or agent id
-- ARGV[4]  size in bytes
-- ARGV[5]  quota for a tenant whose hash has none (created before quotas)
-- ARGV[6]  optional 'refund': undo a charge whose write failed or was not
--          committed (an upload that failed, a state FINALIZE answered
--          lost / conflict / cancelled for): ARGV[4] is then the size the
--          item had before (0: none), ARGV[7] the size that charge set. Only
--          if the item is still at ARGV[7] (no later charge moved it) is it
--          set back; without the refund the bytes stayed counted until the
--          same item was stored again (forever for a one-off item).
-- Returns: {'ok', used after, size before} | {'quota', limit, used, extra bytes asked}
--          | {'no_tenant'} | refund: {'ok', used after} | {'moved', used}
-- Errors:  malformed arguments (nothing written).
local t, kind, item = ARGV[1], ARGV[2], ARGV[3]
local size, default = uint(ARGV[4]), uint(ARGV[5])
local refund = ARGV[6] == 'refund'
local charged = uint(ARGV[7] or '0')
local kinds = { component = true, context = true, state = true }
if t == '' or item == '' or not kinds[kind] or size == nil or default == nil
  or KEYS[2] ~= tkey(t) or (ARGV[6] ~= nil and not refund) or charged == nil then
  return fail('malformed arguments')
end
if redis.call('EXISTS', KEYS[2]) == 0 then return { 'no_tenant' } end
local ukey = B .. 'usage:' .. t
local field = kind .. ':' .. item
local old = tonumber(redis.call('HGET', ukey, field) or 0) or 0
local f = redis.call('HMGET', KEYS[2], kind .. '_bytes', 'max_' .. kind .. '_bytes')
local used = tonumber(f[1] or 0) or 0
local limit = tonumber(f[2] or default) or default
if refund then
  if redis.call('HEXISTS', ukey, field) == 0 or old ~= charged then return { 'moved', used } end
  if size == 0 then redis.call('HDEL', ukey, field) else redis.call('HSET', ukey, field, size) end
  local after = math.max(used - charged + size, 0)
  redis.call('HSET', KEYS[2], kind .. '_bytes', string.format('%d', after))
  return { 'ok', after }
end
local delta = size - old
if delta > 0 and used + delta > limit then
  return { 'quota', limit, used, delta }
end
redis.call('HSET', ukey, field, size)
-- HSET, not HINCRBY: Lua renders a large total as 1e+15, which HINCRBY refuses.
redis.call('HSET', KEYS[2], kind .. '_bytes', string.format('%d', used + delta))
return { 'ok', used + delta, old }
