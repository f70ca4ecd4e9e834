-- RENEW: extend a lease, only for the holder of the current fencing token.
--
-- KEYS[1]  shard anchor            KEYS[2]  job hash KEYS[1]:j:<job>
-- ARGV[1]  job id               ARGV[2]  fencing token
-- ARGV[3]  lease ms
-- Returns: {'ok', lease_until} | {'lost'} (not running, or another token)
--          | {'cancelled'} (the tenant cancelled it: stop and FINALIZE as cancelled)
-- Errors:  malformed arguments.
local jid, token, lease = ARGV[1], uint(ARGV[2]), uint(ARGV[3])
if token == nil or lease == nil or lease == 0 or KEYS[2] ~= jkey(jid) then
  return fail('malformed arguments')
end
local J = job_meta(KEYS[2])
if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
if J.cancel == '1' then return { 'cancelled' } end
local now = now_ms()
if n(J, 'lease_until') < now then
  -- Expired but not yet reaped: the lease is still this holder's, since no
  -- one else can have claimed the job; extending it is safe.
end
local until_ms = now + lease
redis.call('HSET', KEYS[2], 'lease_until', I(until_ms))
redis.call('ZADD', LEASES, until_ms, jid)
-- Reset the PEL entry's idle time, so XPENDING's idle reflects the last renewal.
redis.call('XCLAIM', qkey(J.tenant), GROUP, J.worker, 0, J.sid, 'JUSTID')
return { 'ok', until_ms }
