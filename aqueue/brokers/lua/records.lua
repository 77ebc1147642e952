-- The records of jobs as they stand. A job that a lean delivery runs (see lean_delivery) still
-- has a 'pending' record: it is shown running, with what its start would have written.
-- KEYS[1] prefix
-- ARGV: now, a budget in bytes (0: none), then job ids
-- Returns per job its record's field/value pairs, empty when there is none: for every id, or for
-- the first ones only, up to the record whose values bring the reply to the budget (one at least):
-- a call holds Redis while it copies what it returns.
local now, budget, size = ARGV[1], tonumber(ARGV[2]), 0
local out = {}
for i = 3, #ARGV do
  local jk = job_key(ARGV[i])
  local rec = redis.call('HGETALL', jk)
  for j = 1, #rec, 2 do
    if rec[j] == 'state' then
      local pending = rec[j + 1] == 'pending' and lean_running(jk)
      if pending then
        rec[j + 1] = 'running'
        with(rec, unpack(lean_start(pending, now)))
      end
      break
    end
  end
  out[#out + 1] = rec
  if budget > 0 then
    for j = 2, #rec, 2 do size = size + #rec[j] end
    if size >= budget then break end
  end
end
return out
