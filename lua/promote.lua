-- PROMOTE: move due delayed jobs to their tenants' ready streams, in batches.
-- Atomic, so schedulers racing each other promote each job once.
--
-- KEYS[1]  shard anchor (derived: delayed, j:<job>, q:<tenant>, t:<tenant>, act:*)
-- ARGV[1]  batch size           ARGV[2..5] prices (see SUBMIT)
-- Returns: number of jobs promoted.
-- Errors:  malformed arguments.
local batch = uint(ARGV[1])
local P = prices(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if batch == nil or batch == 0 or P == nil then return fail('malformed arguments') end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, batch)
local moved = 0
for _, jid in ipairs(due) do
  redis.call('ZREM', DELAYED, jid)
  local J = job_meta(jkey(jid))
  if J.state == 'delayed' then
    local T = tenant_meta(tkey(J.tenant))
    to_ready(jid, J, T)
    refresh(J.tenant, T, P)
    moved = moved + 1
  end
end
if moved > 0 then wake() end
return moved
