-- End deliveries, each as its completion says.
-- KEYS[1] prefix
-- ARGV: result_ttl, when the records ended here expire (whole seconds, the latest finished_at
--       plus result_ttl, rounded up), how many ended entries may wait behind a pending one for
--       the trim (see trim_acked), then per completion: job id, token, band, entry id, the
--       delivery's started_at and worker, outcome, result, error, retry_at ('' = now), reason,
--       finished_at, the number of activations, and that many pairs of job id, payload (waiting
--       jobs to make ready, applied with a success). A success with no error, retry_at or reason
--       comes as outcome 'ok', without those three.
-- Returns 1 per applied completion, 0 where the token was stale (a newer delivery owns the job),
-- but for a stale success of the job's current run (see the comment on `current`).
local ttl = tonumber(ARGV[1])
local out = {}
local acked = {}  -- per stream: the entries ended here
local streams = {}  -- per band: its stream's key
local expire = expire_arg(ttl)
expiring_batch, expiring_second = {}, ARGV[2]  -- finalize's listing, done once for the whole batch
local keep = tonumber(ARGV[3])
local i = 4
while i <= #ARGV do
  local id, token, p, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local started_at, worker, outcome = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  i = i + 2
  local result, err, retry_at, reason, now, activations
  if outcome == 'ok' then  -- the usual completion: three arguments fewer to send and to read
    outcome, result, err, retry_at, reason, now, activations =
      'succeeded', ARGV[i + 5], '', '', '', ARGV[i + 6], ARGV[i + 7]
    i = i + 8
  else
    result, err, retry_at, reason, now, activations =
      ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9], ARGV[i + 10]
    i = i + 11
  end
  local first_activation = i
  if activations ~= '0' then i = i + 2 * tonumber(activations) end
  local jk = job_key(id)
  local now_token, state, more = unpack(redis.call('HMGET', jk, 'token', 'state', 'more'))
  -- A lean delivery wrote nothing when it started.
  local lean = lean_live(token, now_token, state)
  local current = lean or (now_token == token and state == 'running')
  -- Else, a success from an earlier delivery of the run that is still going on (the same entry):
  -- its worker was alive but silent, its loop blocked, while another took the job over. The work
  -- is done, so it ends the job; refused, it would hand the job round until the dead letters.
  -- Not if the job's payload changed since that delivery (a chord's callback given new values,
  -- see refire): the work done is not the job's any more.
  if not current and not (outcome == 'succeeded' and state == 'running'
      and redis.call('HGET', jk, 'entry') == entry and not outdated(jk, token)) then
    out[#out + 1] = 0
  else
    -- The record names the run that ended the job: a lean delivery wrote no start, and a late
    -- success's start is not the one written since by the delivery that took over.
    local stamp = lean or not current
    local s = streams[p]
    if not s then
      s = stream_key(p)
      streams[p], acked[s] = s, {}
    end
    acked[s][#acked[s] + 1] = entry
    if outcome == 'succeeded' and more == '0' then
      -- The common end, written without finalize: the record has no key, waiter, error or
      -- workflow link to see to (the flag says so), only its own fields and expiry. Written out,
      -- without a table of fields: most jobs end here.
      if stamp then
        redis.call('HSET', jk, 'result', result, 'state', 'succeeded', 'finished_at', now,
          'started_at', started_at, 'worker', worker)
      else
        redis.call('HSET', jk, 'result', result, 'state', 'succeeded', 'finished_at', now)
      end
      redis.call('EXPIRE', jk, expire)
      expiring_batch[#expiring_batch + 1] = id
    else
      local fields = {}
      if stamp then fields = {'started_at', started_at, 'worker', worker} end
      local rec = {token = now_token, state = state}
      if more ~= '0' then rec = end_fields(jk) end  -- set, or a record from before the flag
      rec.result = false
      -- The job may run again (a retry, a dead letter retried): its token 1 is used up.
      if lean then with(fields, 'token', '1') end
      -- A cancel asked for while it ran outlasts a failure that came before the job heard of it:
      -- neither retried nor dead-lettered, it ends cancelled. (The flag comes with `more`.)
      if outcome ~= 'succeeded' and outcome ~= 'cancelled' and more ~= '0'
          and redis.call('HGET', jk, 'cancel') == '1' then
        outcome, err, reason = 'cancelled', '', ''
      end
      if err ~= '' then with(fields, 'error', err, 'more', '1') end
      if (outcome == 'succeeded' or outcome == 'failed') and rec.fresh
          and tonumber(token) < tonumber(rec.fresh) then
        -- A chord callback whose values changed while it ran (see refire): it runs again with
        -- them, and this run's end is not the job's (its steps, chord and waiters wait for the
        -- next). A revoke or cancel asked for meanwhile stands.
        rearm(id, jk, nil, true)
        outcome = 'again'
      elseif outcome == 'retry' or outcome == 'defer' or outcome == 'asked' then
        -- 'asked': a retry the job asked for (RetryTask), counted apart from those it used.
        if outcome ~= 'defer' then redis.call('HINCRBY', jk, 'attempt', 1) end
        if outcome == 'asked' then redis.call('HINCRBY', jk, 'asked', 1) end
        redis.call('HDEL', jk, 'progress')  -- the next run starts over
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
        end
        finalize(id, jk, outcome, now, ttl, reason, rec, fields)
      end
    end
    if outcome == 'succeeded' then
      for a = first_activation, i - 1, 2 do activate(ARGV[a], ARGV[a + 1]) end
    end
    out[#out + 1] = 1
  end
end
flush_expiring()
-- One XACK per stream, one trim up to what the group has delivered (comparing the entries
-- themselves to find the newest cost more than both). Every band is acked before any is trimmed:
-- a script stops at its first error, and a trim that failed must not leave later bands un-acked.
for s, entries in pairs(acked) do call_chunked(entries, 'XACK', s, GROUP) end
for s, entries in pairs(acked) do trim_acked(s, entries, keep) end
return out
