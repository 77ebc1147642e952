-- Enqueue a periodic task's job for one tick, once however many schedulers ask.
-- KEYS[1] prefix
-- ARGV: now, tick, then the job: id, task, payload, priority, eta, expires, key
-- Returns 1 when this call enqueued it, 0 when that tick (or a later one) was enqueued already,
-- -2 when the tick is over EARLY seconds ahead of Redis's own clock (ask again: it is taken once
-- Redis's clock reaches it), -1 when it is over CLOCK_AHEAD seconds ahead (refused).
local EARLY, CLOCK_AHEAD = 1, 300
local now, tick = ARGV[1], ARGV[2]
local task = ARGV[4]
local hkey = prefix .. 'ticks'
-- A tick is taken on Redis's clock, not the scheduler's: taken early by a scheduler whose clock
-- runs ahead, it would run before its time, and, recorded as the task's latest, make the other
-- schedulers' ticks up to it look past: once that scheduler stopped, the task would not run until
-- real time caught up with it. Far ahead (a host resumed with a wrong clock), it is refused.
local clock = redis.call('TIME')
local ahead = tonumber(tick) - (tonumber(clock[1]) + tonumber(clock[2]) / 1e6)
if ahead > CLOCK_AHEAD then return -1 end
if ahead > EARLY then return -2 end
local last = redis.call('HGET', hkey, task)
if last and tonumber(last) >= tonumber(tick) then return 0 end
redis.call('HSET', hkey, task, tick)
store_job(now, ARGV[3], task, ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], nil)
return 1
