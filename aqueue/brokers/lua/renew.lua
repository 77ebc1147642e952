-- Renew the leases a consumer holds, in one step.
-- KEYS[1] prefix
-- ARGV: consumer, now, then triples: band, entry id, job id
-- Returns the job ids whose lease the consumer no longer holds (left untouched).
local consumer, now = ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV, 3 do
  local s, entry = stream_key(ARGV[i]), ARGV[i + 1]
  local pending = redis.pcall('XPENDING', s, GROUP, entry, entry, 1)
  -- NOGROUP: the stream went with Redis's data (a restart without it): the lease went too, as
  -- once a receive has made the group again.
  if pending.err then pending = {} end
  if #pending == 1 and pending[1][2] == consumer then
    -- A lean delivery's start is written down first: XCLAIM resets the idle time it is read from.
    local jk = job_key(ARGV[i + 2])
    local rec = redis.call('HMGET', jk, 'state', 'token', 'entry')
    if rec[1] == 'pending' and rec[2] == '0' and rec[3] == entry then
      redis.call('HSET', jk, 'state', 'running', unpack(lean_start(pending[1], now)))
    end
    redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')  -- resets the idle time
  else
    lost[#lost + 1] = ARGV[i + 2]
  end
end
return lost
