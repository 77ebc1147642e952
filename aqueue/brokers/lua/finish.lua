-- End deliveries, each as its completion says.
-- KEYS[1] prefix
-- ARGV: result_ttl, then the completions as one JSON array of string arrays: job id, token, band,
--       entry id, outcome, result, error, retry_at ('' = now), reason, finished_at, and the
--       activations (waiting jobs to make ready: [id, payload] pairs, applied with a success)
-- Returns 1 per applied completion, 0 where the token was stale (a newer delivery owns the job).
local ttl = tonumber(ARGV[1])
local out = {}
local acked = {}  -- per stream: the entries acked here
for _, c in ipairs(cjson.decode(ARGV[2])) do
  local id, token, p, entry, outcome, result, err, retry_at, reason, now, activations = unpack(c)
  local jk = job_key(id)
  local rec = end_fields(jk)
  if rec.token ~= token or rec.state ~= 'running' then
    out[#out + 1] = 0
  else
    local s = stream_key(p)
    -- Only an entry the group delivered (it was pending) bounds the trim: a claimed job's entry
    -- (immediate mode) was never read through the group, and newer ones may wait before it.
    if drop_entry(s, entry) == 1 then
      acked[s] = acked[s] or {}
      acked[s][#acked[s] + 1] = entry
    end
    local fields = {}
    if err ~= '' then
      with(fields, 'error', err)
      rec.error = err
    end
    if outcome == 'retry' or outcome == 'defer' then
      if outcome == 'retry' then redis.call('HINCRBY', jk, 'attempt', 1) end
      with(fields, 'deliveries', 0)
      if retry_at ~= '' and tonumber(retry_at) > tonumber(now) then
        redis.call('HSET', jk, unpack(with(fields, 'state', 'scheduled', 'eta', retry_at, 'entry', '')))
        redis.call('ZADD', prefix .. 'scheduled', retry_at, id)
      else
        make_ready(id, jk, p, fields)
      end
    else
      if outcome == 'succeeded' then
        with(fields, 'result', result)
        rec.result = result
        if rec.error then
          redis.call('HDEL', jk, 'error')
          rec.error = false
        end
      end
      finalize(id, jk, outcome, now, ttl, reason, rec, fields)
      if outcome == 'succeeded' then
        for _, a in ipairs(activations) do activate(a[1], a[2]) end
      end
    end
    out[#out + 1] = 1
  end
end
for s, entries in pairs(acked) do
  local newest = entries[1]
  for _, entry in ipairs(entries) do if id_after(entry, newest) then newest = entry end end
  trim_acked(s, newest, entries)
end
return out
