-- LOG: store what a running attempt's agent has logged so far, so readers
-- (GET /log, the events stream) see its lines while it runs. The worker
-- sends what is new in batches (every ~250 ms or 4 KiB), never per line.
-- Fenced like RENEW: only the holder of the current token of a running
-- job writes; a stale worker writes nothing. Bounded: the log never holds
-- more than ARGV[5] bytes (the same bound as FINALIZE's log), whatever the
-- caller sends. FINALIZE later replaces it with the attempt's whole log.
-- The job's `logat` names the attempt (run number) the stored log is of,
-- so a reader tells this attempt's lines from an earlier attempt's.
--
-- KEYS[1]  shard anchor            KEYS[2]  job hash KEYS[1]:j:<job>
-- KEYS[3]  the job's log KEYS[1]:log:<job>
-- ARGV[1]  job id               ARGV[2]  fencing token
-- ARGV[3]  offset: bytes of this attempt's log the caller has stored (0
--          for its first batch, which replaces an earlier attempt's log)
-- ARGV[4]  the new bytes        ARGV[5]  cap: most bytes the log may hold
-- Returns: {'ok', length} (stored, or already stored by a retried call)
--          | {'lost'} (not running, or another token)
--          | {'conflict', length} (the stored log is not `offset` bytes of
--            this attempt: send it again from 0)
--          | {'quota', length} (the batch would pass the cap: nothing written)
-- Errors:  malformed arguments (nothing written).
local jid, token, off, cap = ARGV[1], uint(ARGV[2]), uint(ARGV[3]), uint(ARGV[5])
local chunk = ARGV[4]
if token == nil or off == nil or cap == nil or KEYS[2] ~= jkey(jid)
  or KEYS[3] ~= B .. 'log:' .. jid then
  return fail('malformed arguments')
end
local J = job_meta(KEYS[2])
if J.state ~= 'running' or n(J, 'token') ~= token then return { 'lost' } end
local attempt = n(J, 'attempts')
local mine = tonumber(redis.call('HGET', KEYS[2], 'logat') or '') == attempt
local len = 0
if mine then len = redis.call('STRLEN', KEYS[3]) end
if off > 0 then
  if not mine then return { 'conflict', 0 } end
  -- A retried call whose answer was lost: already stored.
  if len == off + #chunk then return { 'ok', len } end
  if len ~= off then return { 'conflict', len } end
end
if off + #chunk > cap then return { 'quota', len } end
if off == 0 then
  redis.call('SET', KEYS[3], chunk)
  if not mine then redis.call('HSET', KEYS[2], 'logat', I(attempt)) end
else
  redis.call('APPEND', KEYS[3], chunk)
end
return { 'ok', off + #chunk }
