-- REAP: recover the jobs of dead workers.
--
-- The lease index (a sorted set by expiry) finds expired leases in O(log n);
-- each one's delivery is then taken back from the tenant stream's PEL
-- (XCLAIM to the reaper, XACK, XDEL). The lost attempt is not charged: its
-- whole reservation is released. The job goes straight back to the end of
-- its tenant's ready queue (as BullMQ moves a stalled job back to wait: the
-- worker died, the job did not fail, so it waits no backoff), or fails with
-- `lease_expired` once max_attempts are spent (a job that kills every
-- worker it runs on is bounded by that), or ends `cancelled` if the tenant
-- had cancelled it. The claim's fair-share estimate is refunded: the tenant
-- got no slot-time from it. Waiting workers are woken.
--
-- KEYS[1]  shard anchor (derived: leases, j:<job>, t:<tenant>, q:<tenant>, ...)
-- ARGV[1]  batch size           ARGV[2..5] prices (see SUBMIT)
-- Returns: number of jobs reaped.
-- Errors:  malformed arguments.
local batch = uint(ARGV[1])
local P = prices(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if batch == nil or P == nil then
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
    local T = tenant_meta(tkey(t))
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
      if c >= n(J, 'max_attempts') then
        finish(jid, J, 'failed', now, { 'ekind', 'lease_expired',
          'emsg', 'lost ' .. c .. ' attempt(s) to workers that stopped renewing their lease' })
      else
        redis.call('HSET', jkey(jid), 'ekind', 'lease_expired',
          'emsg', 'worker lost its lease; retrying')
        requeue(jid, J, T)
      end
    end
    refresh(t, T, P)
    reaped = reaped + 1
  end
end
if reaped > 0 then wake() end
return reaped
