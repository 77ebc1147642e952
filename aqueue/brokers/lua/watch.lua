-- Wait for a job's outcome: the record when the job is final already; otherwise the waiter is
-- registered on the record, and the step that ends the job publishes the outcome to it.
-- KEYS[1] prefix
-- ARGV: job id, waiter (the inbox of the waiting process: its channel is done_channel(waiter))
-- Returns the record (HGETALL) when final, nil when the job is unknown, and when registered, how
-- many of the job's ends were told so far: a message of one of those (a retried job's earlier
-- end, its message read only now) is not this wait's.
local jk = job_key(ARGV[1])
local state = redis.call('HGET', jk, 'state')
if not state then return nil end
if FINAL[state] then return redis.call('HGETALL', jk) end
local waiters = redis.call('HGET', jk, 'waiters')
if not waiters or waiters == '' then
  redis.call('HSET', jk, 'waiters', ARGV[2], 'more', '1')
elseif not string.find(' ' .. waiters .. ' ', ' ' .. ARGV[2] .. ' ', 1, true) then
  -- A process that stopped waiting is never taken off (a timeout, a cancel): past about 64
  -- processes (16-character inboxes), the longest-registered go, as the ones most likely gone; one
  -- still waiting hears of the end when it reads the job again.
  while #waiters > 1070 do waiters = string.sub(waiters, string.find(waiters, ' ', 1, true) + 1) end
  redis.call('HSET', jk, 'waiters', waiters .. ' ' .. ARGV[2], 'more', '1')
end
return tonumber(redis.call('HGET', jk, 'ends') or '0') or 0  -- another writer's: none told
