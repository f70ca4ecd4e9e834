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
-- Returns: {'ok', used after} | {'quota', limit, used, extra bytes asked} | {'no_tenant'}
-- Errors:  malformed arguments (nothing written).
local t, kind, item = ARGV[1], ARGV[2], ARGV[3]
local size, default = uint(ARGV[4]), uint(ARGV[5])
local kinds = { component = true, context = true, state = true }
if t == '' or item == '' or not kinds[kind] or size == nil or default == nil
  or KEYS[2] ~= tkey(t) then
  return fail('malformed arguments')
end
if redis.call('EXISTS', KEYS[2]) == 0 then return { 'no_tenant' } end
local ukey = B .. 'usage:' .. t
local field = kind .. ':' .. item
local old = tonumber(redis.call('HGET', ukey, field) or 0) or 0
local f = redis.call('HMGET', KEYS[2], kind .. '_bytes', 'max_' .. kind .. '_bytes')
local used = tonumber(f[1] or 0) or 0
local limit = tonumber(f[2] or default) or default
local delta = size - old
if delta > 0 and used + delta > limit then
  return { 'quota', limit, used, delta }
end
redis.call('HSET', ukey, field, size)
-- HSET, not HINCRBY: Lua renders a large total as 1e+15, which HINCRBY refuses.
redis.call('HSET', KEYS[2], kind .. '_bytes', string.format('%d', used + delta))
return { 'ok', used + delta }
