-- End deliveries, each as its completion says.
-- KEYS[1] prefix
-- ARGV: result_ttl, then 11 per completion: job id, token, band, entry id, outcome, result,
--       error, retry_at ('' = now), reason, finished_at, and activations: the next pipeline
--       step's "id\31payload\30" ('' when none), applied with a success only
-- Returns 1 per applied completion, 0 where the token was stale (a newer delivery owns the job).
local ttl = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 11 do
  local id, token, p, entry, outcome, result, err, retry_at, reason, now =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
    ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local jk = job_key(id)
  if not live(jk, token) then
    out[#out + 1] = 0
  else
    drop_entry(stream_key(p), entry)
    if err ~= '' then redis.call('HSET', jk, 'error', err) end
    if outcome == 'retry' or outcome == 'defer' then
      if outcome == 'retry' then redis.call('HINCRBY', jk, 'attempt', 1) end
      redis.call('HSET', jk, 'deliveries', 0)
      if retry_at ~= '' and tonumber(retry_at) > tonumber(now) then
        redis.call('HSET', jk, 'state', 'scheduled', 'eta', retry_at, 'entry', '')
        redis.call('ZADD', prefix .. 'scheduled', retry_at, id)
      else
        make_ready(id, jk, p)
      end
    else
      if outcome == 'succeeded' then
        redis.call('HSET', jk, 'result', result)
        redis.call('HDEL', jk, 'error')
      end
      finalize(id, jk, outcome, now, ttl, reason)
      if outcome == 'succeeded' then
        for next_id, payload in string.gmatch(ARGV[i + 10], '([^\31\30]*)\31([^\30]*)\30') do
          activate(next_id, payload)
        end
      end
    end
    out[#out + 1] = 1
  end
end
return out
