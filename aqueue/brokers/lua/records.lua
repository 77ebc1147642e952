-- The records of jobs as they stand. A job that a lean delivery runs (see lean_delivery) still
-- has a 'pending' record: it is shown running, with what its start would have written.
-- KEYS[1] prefix
-- ARGV: now, then job ids
-- Returns per job its record's field/value pairs, empty when there is none.
local now = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local jk = job_key(ARGV[i])
  local rec = redis.call('HGETALL', jk)
  for j = 1, #rec, 2 do
    if rec[j] == 'state' then
      if rec[j + 1] == 'pending' then
        local _, _, lean, pending = queued_entry(jk)
        if lean and pending then
          rec[j + 1] = 'running'
          with(rec, unpack(lean_start(pending, now)))
        end
      end
      break
    end
  end
  out[#out + 1] = rec
end
return out
