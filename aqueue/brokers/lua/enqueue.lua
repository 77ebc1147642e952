-- Store jobs and make each ready or scheduled.
-- KEYS[1] prefix
-- ARGV: now, then 7 per job: id, task, payload, priority, eta ('' = now), expires (''), key ('')
-- Returns the id each job lives under (an existing live job's id for a repeated idempotency key).
local now = ARGV[1]
local out = {}
for i = 2, #ARGV, 7 do
  out[#out + 1] = store_job(now, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5], ARGV[i + 6])
end
return out
