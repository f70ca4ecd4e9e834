-- RELEASE: a draining worker hands a claimed job back, uncharged and without
-- using up an attempt. Needs the current fencing token.
--
-- KEYS[1]  shard tag            KEYS[2]  job hash KEYS[1]:j:<job>
-- ARGV[1]  job id               ARGV[2]  fencing token
-- ARGV[3..6] prices (see SUBMIT)
-- Returns: {'ok'} | {'lost'}
-- Errors:  malformed arguments.
local jid, token = ARGV[1], uint(ARGV[2])
local P = prices(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if token == nil or P == nil or KEYS[2] ~= jkey(jid) then return fail('malformed arguments') end
local J = hgetall(KEYS[2])
if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
local t = J.tenant
local T = hgetall(tkey(t))
release_reservation(jid, J, T)
end_attempt(jid, J, T)
redis.call('HSET', KEYS[2], 'attempts', n(J, 'attempts') - 1)
if J.cancel == '1' then
  redis.call('HSET', KEYS[2], 'ekind', 'cancelled', 'emsg', 'cancelled by the tenant')
  finish(jid, J, 'cancelled', now_ms())
else
  to_ready(jid, J, T)
  redis.call('HINCRBY', tkey(t), 'queued', 1)
  T.queued = n(T, 'queued') + 1
end
refresh(t, T, P)
wake()
return { 'ok' }
