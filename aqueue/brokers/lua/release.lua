-- Hand leased jobs back unfinished: ready again at once, the hand-back not counted as a delivery.
-- KEYS[1] prefix
-- ARGV: job id, token, band, entry id, and '1' if the job never ran and its expiry still held as
--       it was delivered (it holds on), else '0' (5 per job)
for i = 1, #ARGV, 5 do
  local id, token, p, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jk = job_key(id)
  local state = live(jk, token)
  if state == 'running' then
    drop_entry(stream_key(p), entry)
    redis.call('HINCRBY', jk, 'deliveries', -1)
    if ARGV[i + 4] == '1' then redis.call('HSET', jk, 'unstarted', '1') end
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
