-- Hand leased jobs back unfinished: ready again at once, the hand-back not counted as a delivery.
-- KEYS[1] prefix
-- ARGV: '1' if the jobs never ran (their expiry still holds) else '0', then job id, token, band,
--       entry id (4 per job)
local unstarted = ARGV[1] == '1'
for i = 2, #ARGV, 4 do
  local id, token, p, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jk = job_key(id)
  local state = live(jk, token)
  if state == 'running' then
    drop_entry(stream_key(p), entry)
    redis.call('HINCRBY', jk, 'deliveries', -1)
    if unstarted and redis.call('HEXISTS', jk, 'expires') == 1 then
      redis.call('HSET', jk, 'unstarted', '1')
    end
    -- No one runs it now (a lean start wrote none), and the next run starts over.
    redis.call('HDEL', jk, 'started_at', 'worker', 'progress')
    make_ready(id, jk, p)
  elseif state then  -- a lean delivery, never counted: its token is used up all the same
    drop_entry(stream_key(p), entry)
    redis.call('HDEL', jk, 'progress')  -- it may have said some
    make_ready(id, jk, p, {'token', '1'})
  end
end
return 0
