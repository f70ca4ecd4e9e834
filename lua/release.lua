-- RELEASE: a worker hands a claimed job back, uncharged and without using
-- up an attempt. Needs the current fencing token.
--
-- Two kinds of hand-back:
--   'drain'  the worker is shutting down: back to the ready queue at once.
--   'fault'  the node could not start the run (a component or context it
--            could not load, a transient failure of its own): a node fault,
--            requeued with backoff, and bounded: at ARGV[9] faults the job
--            fails with `node_fault` (so a job no node can start does not
--            cycle forever). Never charged, never counted toward max_attempts.
-- A job the tenant cancelled ends `cancelled` either way. The run keeps its
-- run number (`attempts`); the claim's fair-share estimate is refunded.
--
-- KEYS[1]  shard anchor            KEYS[2]  job hash KEYS[1]:j:<job>
-- ARGV[1]  job id               ARGV[2]  fencing token
-- ARGV[3..6] prices (see SUBMIT)
-- ARGV[7]  'drain' | 'fault'    ARGV[8]  what failed (fault)
-- ARGV[9]  node faults after which the job fails
-- ARGV[10] retry base ms        ARGV[11] retry max ms   ARGV[12] jitter 0..999
-- Returns: {'ok'} (requeued) | {'retry', delay_ms} | {'failed'} | {'cancelled'}
--          | {'lost'}
-- Errors:  malformed arguments.
local jid, token = ARGV[1], uint(ARGV[2])
local P = prices(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
local mode, msg = ARGV[7], ARGV[8] or ''
local max_faults, base, maxd, jitter = uint(ARGV[9]), uint(ARGV[10]), uint(ARGV[11]), uint(ARGV[12])
if token == nil or P == nil or KEYS[2] ~= jkey(jid) or (mode ~= 'drain' and mode ~= 'fault')
  or max_faults == nil or base == nil or maxd == nil or jitter == nil then
  return fail('malformed arguments')
end
local J = job_meta(KEYS[2])
if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
local t = J.tenant
local T = tenant_meta(tkey(t))
local now = now_ms()
release_reservation(jid, J, T)
end_attempt(jid, J, T)
correct_vtime(t, J, T, 0)
redis.call('HSET', KEYS[2], 'releases', I(n(J, 'releases') + 1))
local result
if J.cancel == '1' then
  finish_cancelled(jid, J, now)
  result = { 'cancelled' }
elseif mode == 'fault' then
  result = node_fault(jid, J, T, msg, max_faults, base, maxd, jitter, now)
else
  uncount(jid, J)
  requeue(jid, J, T)
  result = { 'ok' }
end
refresh(t, T, P)
wake()
return result
