-- Lease one particular ready job (immediate mode runs its own jobs, no others).
-- KEYS[1] prefix
-- ARGV: job id, consumer, now, max_deliveries, result_ttl
-- Returns the delivery (or a notice), or false when the job is not ready.
local id = ARGV[1]
local jk = job_key(id)
local rec = redis.call('HMGET', jk, 'state', 'entry', 'priority')
if rec[1] ~= 'pending' or not rec[2] or rec[2] == '' then return false end
local s = stream_key(rec[3])
-- Delivered already (a lean delivery runs it, see lean_delivery, or a start is on its way).
if #redis.call('XPENDING', s, GROUP, rec[2], rec[2], 1) > 0 then return false end
redis.call('XDEL', s, rec[2])  -- not read by any worker yet: it leaves the stream here
return start(s, rec[3], rec[2], {'id', id}, ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]) or false
