-- CANCEL: a tenant cancels a job. Queued or delayed jobs end now; a running
-- job is flagged and ends at its next lease check (RENEW answers 'cancelled').
--
-- KEYS[1]  shard anchor            KEYS[2]  job hash KEYS[1]:j:<job>
-- ARGV[1]  tenant id (must own the job)   ARGV[2]  job id
-- ARGV[3..6] prices (see SUBMIT)
-- Returns: {'ok', state the job was in} | {'not_found'}
-- Errors:  malformed arguments.
local t, jid = ARGV[1], ARGV[2]
local P = prices(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if P == nil or KEYS[2] ~= jkey(jid) then return fail('malformed arguments') end
local J = job_meta(KEYS[2])
if J.tenant ~= t then return { 'not_found' } end
local now = now_ms()
local was = J.state
if J.state == 'queued' or J.state == 'delayed' then
  local T = tenant_meta(tkey(t))
  if J.state == 'queued' then
    if (J.sid or '') ~= '' then redis.call('XDEL', qkey(t), J.sid) end
  else
    redis.call('ZREM', DELAYED, jid)
  end
  add_queued(t, T, -1)
  redis.call('HSET', KEYS[2], 'cancel', 1, 'sid', '')
  finish_cancelled(jid, J, now)
  refresh(t, T, P)
elseif J.state == 'running' then
  redis.call('HSET', KEYS[2], 'cancel', 1)
end
return { 'ok', was }
