-- Store plain jobs (no key, eta, expiry or workflow link) and make each ready: what enqueue.lua
-- does for them, with half its arguments and none of its branches (see store_plain).
-- KEYS[1] prefix
-- ARGV: now, how many jobs of the same enqueue earlier calls stored (see in_order_after), then 4
--       per job: id, task, payload, priority
-- Returns nothing: each job lives under its own id, as a job already stored under it does.
local now = ARGV[1]
in_order_after(ARGV[2])
for i = 3, #ARGV, 4 do
  store_plain(now, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
