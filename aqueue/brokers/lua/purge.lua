-- Delete every dead letter, its record and its index entry, then the batches that only a dead
-- letter kept (see settle_batch): none can change now, but one whose member, retried before, runs
-- again.
-- KEYS[1] prefix
-- Returns how many dead letters.
local dkey = prefix .. 'dead'
local ids = redis.call('ZRANGE', dkey, 0, -1)
for _, id in ipairs(ids) do redis.call('DEL', job_key(id)) end
call_chunked(ids, 'ZREM', prefix .. 'index')  -- a dead letter never expires: nothing else would
redis.call('DEL', dkey)
local kept = prefix .. 'batches'
for _, bid in ipairs(redis.call('SMEMBERS', kept)) do
  local bk = prefix .. 'batch:' .. bid
  local fields = redis.call('HGETALL', bk)
  local size, ended, again = 0, 0, false
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'size' then size = tonumber(value)
    elseif name == 'ended' then ended = tonumber(value)
    elseif not again and string.sub(name, 1, 2) == 'm:' and value ~= 'succeeded' then
      -- Retried, yet still counted as ended: a batch that an earlier release wrote.
      local state = redis.call('HGET', job_key(string.sub(name, 3)), 'state')
      again = state and not FINAL[state]
    end
  end
  -- A member retried is not counted as ended (see retry.lua): the batch waits for its end.
  if not again and ended >= size then
    redis.call('DEL', bk)
    redis.call('SREM', kept, bid)
  end
end
return #ids
