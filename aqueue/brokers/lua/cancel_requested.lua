-- Of these jobs, those whose record holds a cancel request (a worker looks for requests whose
-- push it missed, for every job it runs, in one call).
-- KEYS[1] prefix
-- ARGV: job ids
local out = {}
for i = 1, #ARGV do
  if redis.call('HGET', job_key(ARGV[i]), 'cancel') == '1' then out[#out + 1] = ARGV[i] end
end
return out
