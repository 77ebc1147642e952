-- Delete every dead letter and its record, then the batches that only a dead letter kept (see
-- settle_batch): none can change now, but one whose member, retried before, runs again.
-- KEYS[1] prefix
-- Returns how many dead letters.
local dkey = prefix .. 'dead'
local ids = redis.call('ZRANGE', dkey, 0, -1)
for _, id in ipairs(ids) do redis.call('DEL', job_key(id)) end
redis.call('DEL', dkey)
local kept = prefix .. 'batches'
for _, bid in ipairs(redis.call('SMEMBERS', kept)) do
  local bk = prefix .. 'batch:' .. bid
  local fields = redis.call('HGETALL', bk)
  -- A member retried is no longer counted as ended (see retry.lua): the batch waits for it.
  local size, ended = unpack(redis.call('HMGET', bk, 'size', 'ended'))
  local again = size and tonumber(ended or '0') < tonumber(size)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'm:' and fields[i + 1] ~= 'succeeded' then
      local state = redis.call('HGET', job_key(string.sub(fields[i], 3)), 'state')
      if state and not FINAL[state] then again = true break end
    end
  end
  if not again then
    redis.call('DEL', bk)
    redis.call('SREM', kept, bid)
  end
end
return #ids
