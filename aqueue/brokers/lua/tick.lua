-- Enqueue a periodic task's job for one tick, once however many schedulers ask.
-- KEYS[1] prefix
-- ARGV: now, tick, then the job: id, task, payload, priority, eta, expires, key
-- Returns 1 when this call enqueued it, 0 when that tick (or a later one) was enqueued already,
-- -1 when the tick is over CLOCK_AHEAD seconds ahead of Redis's own clock.
local CLOCK_AHEAD = 300
local now, tick = ARGV[1], ARGV[2]
local task = ARGV[4]
local hkey = prefix .. 'ticks'
-- A scheduler whose clock runs far ahead (a host resumed with a wrong clock) is refused: its tick,
-- recorded, would make every other scheduler's ticks look past, and the task would not run until
-- real time caught up with it.
if tonumber(tick) > tonumber(redis.call('TIME')[1]) + CLOCK_AHEAD then return -1 end
local last = redis.call('HGET', hkey, task)
if last and tonumber(last) >= tonumber(tick) then return 0 end
redis.call('HSET', hkey, task, tick)
store_job(now, ARGV[3], task, ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], nil)
return 1
