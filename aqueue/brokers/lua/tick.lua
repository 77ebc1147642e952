-- Enqueue a periodic task's job for one tick, once however many schedulers ask.
-- KEYS[1] prefix
-- ARGV: now, tick, then the job: id, task, payload, priority, eta, expires, key
-- Returns 1 when this call enqueued it, 0 when that tick (or a later one) was enqueued already.
local now, tick = ARGV[1], ARGV[2]
local task = ARGV[4]
local hkey = prefix .. 'ticks'
local last = redis.call('HGET', hkey, task)
if last and tonumber(last) >= tonumber(tick) then return 0 end
redis.call('HSET', hkey, task, tick)
store_job(now, ARGV[3], task, ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], nil)
return 1
