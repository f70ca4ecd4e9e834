-- RETRY: a failed job runs again as a new attempt of the same job (as
-- BullMQ's `job.retry()`): back at the end of its tenant's ready queue
-- under the same id, its counted attempts reset to 0 (so it has all of
-- `max_attempts` again), its error, finish and start times cleared, and
-- out of the `done` index (RETAIN does not delete it while it is live)
-- and owed no callback until it finishes again.
-- Its next claim is the next run number (`attempts` never goes back), so
-- every reserve / settle / release in the ledger still names one run, and
-- that run is reserved and settled as any other. Admitted as SUBMIT
-- admits a new job: refused at `max_queued`, or when the tenant's balance
-- does not cover the job's reservation, or when the job needs more GPUs
-- than the tenant may hold. Atomic, so of two retries of one job exactly
-- one wins; the other finds it no longer failed.
--
-- KEYS[1]  shard anchor            KEYS[2]  job hash KEYS[1]:j:<job>
-- KEYS[3]  tenant hash KEYS[1]:t:<tenant>
-- ARGV[1]  tenant id (must own the job)   ARGV[2]  job id
-- ARGV[3..6] prices (see SUBMIT)
-- Returns: {'ok', state} (the state it is in now: 'queued')
--          | {'not_found'} | {'conflict', state} (the job is not failed)
--          | {'queue_full'} | {'credits', reservation, balance}
--          | {'insufficient', gpus, max_gpus} (more GPUs than max_gpus)
-- Errors:  malformed arguments (nothing written).
local t, jid = ARGV[1], ARGV[2]
local P = prices(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if P == nil or KEYS[2] ~= jkey(jid) or KEYS[3] ~= tkey(t) then
  return fail('malformed arguments')
end
local J = job_meta(KEYS[2])
if J.tenant ~= t then return { 'not_found' } end
if J.state ~= 'failed' then return { 'conflict', J.state or '' } end
local T = hgetall(KEYS[3])
if n(T, 'queued') >= n(T, 'max_queued') then return { 'queue_full' } end
local g = n(J, 'gpus')
if g > n(T, 'max_gpus') then return { 'insufficient', g, n(T, 'max_gpus') } end
local fuel, timeout = effective(J, T)
local r = reservation(fuel, timeout, g, P, J)
local balance = n(T, 'granted') - n(T, 'settled')
if balance < r then return { 'credits', r, balance } end

redis.call('ZREM', DONE, jid)
-- A live job is owed no callback: the failed run's, if still owed, is
-- dropped, and the next finish owes one afresh (its delivery record too).
redis.call('ZREM', HOOKS, jid)
redis.call('HSET', KEYS[2], 'counted', 0, 'faults', 0, 'conflicts', 0, 'releases', 0,
  'ekind', '', 'emsg', '', 'output', '', 'started', '', 'finished', '', 'cancel', 0,
  'cb_state', '', 'cb_attempts', 0)
requeue(jid, J, T)
-- As SUBMIT: an eligible tenant stays eligible with one more job at the
-- tail of its queue; any other is re-decided (and workers woken).
if (T.parked or '') ~= '' then
  if refresh(t, T, P) then wake() end
end
return { 'ok', J.state }
