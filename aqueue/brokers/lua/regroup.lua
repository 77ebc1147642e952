-- Give the queue's streams their consumer group back where it was lost while the stream stayed
-- (an XGROUP DESTROY by hand): every read failed with NOGROUP, and the queue stood still for good.
-- The new group reads from the start, and the lost group's pending list is gone: an entry whose
-- job has ended (acked, not yet trimmed: see trim_acked) or whose record is gone is deleted
-- first, so that it does not run again; one whose job was running is delivered again.
-- KEYS[1] prefix
-- Returns how many groups it made.
local made = 0
for _, p in ipairs(redis.call('ZRANGE', prefix .. 'priorities', 0, -1)) do
  local s = stream_key(p)
  if redis.call('EXISTS', s) == 1 and not redis.pcall('XGROUP', 'CREATE', s, GROUP, '0').err then
    made = made + 1
    local ended, after = {}, '-'
    repeat
      local rows = redis.call('XRANGE', s, after, '+', 'COUNT', 1000)
      for _, row in ipairs(rows) do
        local entry, fields, id = row[1], row[2], nil
        for i = 1, #fields, 2 do
          if fields[i] == 'id' then id = fields[i + 1] elseif fields[i] == 'wake' then id = false end
        end
        if id == false then
          ended[#ended + 1] = entry  -- a wake-up for workers blocked then: none are now
        elseif id then  -- an entry with no id is not aqueue's: `start` dead-letters it with why
          local rec = redis.call('HMGET', job_key(id), 'state', 'entry')
          if not rec[1] or FINAL[rec[1]] or rec[2] ~= entry then ended[#ended + 1] = entry end
        end
        after = '(' .. entry
      end
    until #rows < 1000
    call_chunked(ended, 'XDEL', s)
  end
end
return made
