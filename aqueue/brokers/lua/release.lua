-- Hand leased jobs back unfinished: ready again at once, the hand-back not counted as a delivery.
-- KEYS[1] prefix
-- ARGV: triples: job id, token, band, entry id (4 per job)
for i = 1, #ARGV, 4 do
  local id, token, p, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jk = job_key(id)
  if live(jk, token) then
    drop_entry(stream_key(p), entry)
    redis.call('HINCRBY', jk, 'deliveries', -1)
    make_ready(id, jk, p)
  end
end
return 0
