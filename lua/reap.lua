-- REAP: recover the jobs of dead workers.
--
-- The lease index (a sorted set by expiry) finds expired leases in O(log n);
-- each one's delivery is then taken back from the tenant stream's PEL
-- (XCLAIM to the reaper, XACK, XDEL). The lost attempt is not charged: its
-- whole reservation is released. The job goes back through the delayed
-- queue with backoff, or fails with `lease_expired` once max_attempts are
-- spent, or ends `cancelled` if the tenant had cancelled it. The claim's
-- fair-share estimate is refunded: the tenant got no slot-time from it.
--
-- KEYS[1]  shard anchor (derived: leases, j:<job>, t:<tenant>, q:<tenant>, ...)
-- ARGV[1]  batch size           ARGV[2]  retry base ms
-- ARGV[3]  retry max ms         ARGV[4]  jitter 0..999
-- ARGV[5..8] prices (see SUBMIT)
-- Returns: number of jobs reaped.
-- Errors:  malformed arguments.
local batch, base, maxd, jitter = uint(ARGV[1]), uint(ARGV[2]), uint(ARGV[3]), uint(ARGV[4])
local P = prices(ARGV[5], ARGV[6], ARGV[7], ARGV[8])
if batch == nil or base == nil or maxd == nil or jitter == nil or P == nil then
  return fail('malformed arguments')
end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, batch)
local reaped = 0
for _, jid in ipairs(due) do
  local J = job_meta(jkey(jid))
  if J.state ~= 'running' then
    redis.call('ZREM', LEASES, jid)
  elseif n(J, 'lease_until') <= now then
    local t = J.tenant
    local T = hgetall(tkey(t))
    if (J.sid or '') ~= '' then
      redis.call('XCLAIM', qkey(t), GROUP, 'reaper', 0, J.sid, 'JUSTID')
    end
    release_reservation(jid, J, T)
    end_attempt(jid, J, T)
    correct_vtime(t, J, T, 0)
    retire_consumer(t, 'reaper')
    if J.cancel == '1' then
      finish_cancelled(jid, J, now)
    else
      local c = counted(J)
      local msg = 'worker lost its lease; retrying'
      if c >= n(J, 'max_attempts') then
        msg = 'lost ' .. c .. ' attempt(s) to workers that stopped renewing their lease'
      end
      redis.call('HSET', jkey(jid), 'ekind', 'lease_expired', 'emsg', msg)
      retry_or_fail(jid, J, T, true, base, maxd, jitter, now)
    end
    refresh(t, T, P)
    reaped = reaped + 1
  end
end
return reaped
