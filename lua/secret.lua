-- SECRET: set or delete one of a tenant's secrets. Values arrive sealed
-- (src/secrets.rs): no plaintext ever reaches Redis or this script.
--
-- KEYS[1]  shard anchor            KEYS[2]  tenant hash KEYS[1]:t:<tenant>
-- KEYS[3]  the tenant's secrets    KEYS[1]:secrets:<tenant>, name ->
--          `<ms set>:<sealed value>`
-- ARGV[1]  op: 'set' | 'delete'   ARGV[2]  secret name
-- set:     ARGV[3] the sealed value, ARGV[4] most secrets a tenant may hold
-- Returns: {'ok'} | {'no_tenant'} | {'not_found'} (delete)
--          | {'quota', max} (set of a new name past the bound)
-- Errors:  malformed arguments (nothing written).
local op, name = ARGV[1], ARGV[2]
if name == nil or name == '' or string.sub(KEYS[3], 1, #B + 8) ~= B .. 'secrets:' then
  return fail('malformed arguments')
end
if redis.call('EXISTS', KEYS[2]) == 0 then return { 'no_tenant' } end
if op == 'set' then
  local max = uint(ARGV[4])
  if ARGV[3] == nil or ARGV[3] == '' or max == nil then return fail('malformed arguments') end
  if redis.call('HEXISTS', KEYS[3], name) == 0 and redis.call('HLEN', KEYS[3]) >= max then
    return { 'quota', max }
  end
  redis.call('HSET', KEYS[3], name, I(now_ms()) .. ':' .. ARGV[3])
  return { 'ok' }
elseif op == 'delete' then
  if redis.call('HDEL', KEYS[3], name) == 0 then return { 'not_found' } end
  return { 'ok' }
end
return fail('unknown op')
