-- Store jobs and make each ready, scheduled or waiting; define the chords and batches they form.
-- KEYS[1] prefix
-- ARGV: now, how many jobs of the same enqueue earlier calls stored (see in_order_after),
--       chord count, 3 per chord: id, size, callback id;
--       batch count, 10 per batch: id, size, then task, payload, priority for each of
--       success, failure and complete ('' when none);
--       then 8 per job: id, task, payload, priority, eta, expires, key, and its workflow fields
--       as one string of "name\31value\30" pairs ('' when none)
-- Returns the id each job lives under (an existing live job's id for a repeated idempotency key).
local now = ARGV[1]
in_order_after(ARGV[2])
local i = 3
for _ = 1, tonumber(ARGV[i]) do
  local ck = prefix .. 'chord:' .. ARGV[i + 1]
  redis.call('HSET', ck, 'size', ARGV[i + 2], 'arrived', 0, 'callback', ARGV[i + 3])
  i = i + 3
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  local bk = prefix .. 'batch:' .. ARGV[i + 1]
  redis.call('HSET', bk, 'size', ARGV[i + 2], 'ended', 0, 'ok', 0)
  local kinds = {'success', 'failure', 'complete'}
  for k = 1, 3 do
    local at = i + 3 + (k - 1) * 3
    if ARGV[at] ~= '' then
      redis.call('HSET', bk, kinds[k] .. '_task', ARGV[at], kinds[k] .. '_payload', ARGV[at + 1],
        kinds[k] .. '_priority', ARGV[at + 2])
    end
  end
  i = i + 11
end
i = i + 1
local out = {}
while i <= #ARGV do
  local extra = {}
  for name, value in string.gmatch(ARGV[i + 7], '([^\31\30]*)\31([^\30]*)\30') do
    extra[#extra + 1] = name
    extra[#extra + 1] = value
  end
  out[#out + 1] = store_job(now, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5], ARGV[i + 6], extra)
  i = i + 8
end
return out
