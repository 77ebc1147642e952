-- Renew the leases a consumer holds, in one step.
-- KEYS[1] prefix
-- ARGV: consumer, now, then triples: band, entry id, job id
-- Returns the job ids whose lease the consumer no longer holds (left untouched). A job Redis
-- knows nothing of any more (no record, its entry leased to no one: a restart without the data)
-- is not among them: no other worker can have it, and it runs on where it is.
local consumer, now = ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV, 3 do
  local s, entry, jk = stream_key(ARGV[i]), ARGV[i + 1], job_key(ARGV[i + 2])
  local pending = redis.pcall('XPENDING', s, GROUP, entry, entry, 1)
  if pending.err then pending = {} end  -- NOGROUP: the stream went with the data
  if #pending == 1 and pending[1][2] == consumer then
    -- A lean delivery's start is written down first: XCLAIM resets the idle time it is read from.
    local rec = redis.call('HMGET', jk, 'state', 'token', 'entry')
    if rec[1] == 'pending' and rec[2] == '0' and rec[3] == entry then
      redis.call('HSET', jk, 'state', 'running', unpack(lean_start(pending[1], now)))
    end
    redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')  -- resets the idle time
  elseif #pending == 1 or redis.call('EXISTS', jk) == 1 then
    lost[#lost + 1] = ARGV[i + 2]
  end
end
return lost
