-- Renew the leases a consumer holds, in one step.
-- KEYS[1] prefix
-- ARGV: consumer, then triples: band, entry id, job id
-- Returns the job ids whose lease the consumer no longer holds (left untouched).
local consumer = ARGV[1]
local lost = {}
for i = 2, #ARGV, 3 do
  local s, entry = stream_key(ARGV[i]), ARGV[i + 1]
  local pending = redis.call('XPENDING', s, GROUP, entry, entry, 1)
  if #pending == 1 and pending[1][2] == consumer then
    redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')  -- resets the idle time
  else
    lost[#lost + 1] = ARGV[i + 2]
  end
end
return lost
