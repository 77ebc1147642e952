-- Make due scheduled jobs ready. Safe from many workers at once: ZREM decides who moves a job.
-- KEYS[1] prefix
-- ARGV: now, limit
-- Returns the eta of the earliest job still scheduled, or false.
local now, limit = ARGV[1], tonumber(ARGV[2])
local zkey = prefix .. 'scheduled'
local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
-- Jobs due at one time move in the order they were enqueued (their index scores), not in the
-- set's order for equal times (their ids). A full batch leaves its last time's jobs to the next,
-- which starts with all of them, unless more than `limit` share that time.
local n = #due / 2
if n == limit and due[2] ~= due[#due] then
  while due[n * 2] == due[#due] do n = n - 1 end
end
local batch = {}
for j = 1, n do
  local id = due[j * 2 - 1]
  batch[j] = {id, tonumber(due[j * 2]), tonumber(redis.call('ZSCORE', prefix .. 'index', id)) or 0}
end
table.sort(batch, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
for _, job in ipairs(batch) do
  local id = job[1]
  redis.call('ZREM', zkey, id)
  local jk = job_key(id)
  local rec = redis.call('HMGET', jk, 'state', 'priority')
  if rec[1] == 'scheduled' then make_ready(id, jk, rec[2]) end
end
local nxt = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
if #nxt == 0 then return false end
return nxt[2]
