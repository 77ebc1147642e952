-- Hand a consumer again the jobs leased to it that it does not know of: a receive or a reclaim
-- whose answer was lost on the way (the connection dropped after Redis ran it) leased them, and
-- its worker never heard. Each is handed over under the lease the consumer holds: its newest
-- token, no delivery counted again (XCLAIM JUSTID), its idle time reset. That includes a job the
-- consumer holds under an older token (its own reclaim took it over, the answer lost). What a
-- blocking read handed to the consumer's waiting name, with no take after it, is taken as the
-- take would, all of it (a read takes `count` of each band; the worker holds the surplus too).
-- KEYS[1] prefix
-- ARGV: consumer, its waiting name, now, max_deliveries, result_ttl, then triples: band, entry
--       id, token of each job the consumer holds (an entry id names an entry of one stream only).
-- Returns {delivery, ...}.
local consumer, waiting, now, max_deliveries, ttl =
  ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local held = {}
for i = 6, #ARGV, 3 do held[ARGV[i] .. ' ' .. ARGV[i + 1]] = ARGV[i + 2] end
local out = {}

-- The entries pending under `name` on stream `s`, a page at a time (no group: none).
local function pending_of(s, name, into)
  local from = '-'
  while true do
    local rows = redis.pcall('XPENDING', s, GROUP, from, '+', 1000, name)
    if rows.err then return end
    for _, row in ipairs(rows) do into[#into + 1] = row[1] end
    if #rows < 1000 then return end
    from = '(' .. rows[#rows][1]
  end
end

for _, p in ipairs(bands()) do
  local s = stream_key(p)
  local entries = {}
  pending_of(s, consumer, entries)
  pending_of(s, waiting, entries)
  for _, entry in ipairs(entries) do
    local found = redis.call('XRANGE', s, entry, entry)[1]
    local known = held[p .. ' ' .. entry]
    if not found then
      if not known then redis.call('XACK', s, GROUP, entry) end  -- deleted meanwhile: nothing to run
    else
      local fields = found[2]
      local id = fields[1] == 'id' and fields[2]
      local rec = id and redis.call('HMGET', job_key(id), 'state', 'worker', 'entry', 'token',
        'task', 'payload', 'attempt', 'enqueued_at')
      -- Started by the call whose answer was lost, or by one before it: that delivery.
      local started = rec and rec[1] == 'running' and rec[2] == consumer and rec[3] == entry
      if not known and rec and FINAL[rec[1]] then
        -- Ended while the consumer never knew of it (a finish that failed before its acks ran):
        -- nothing to run.
        redis.call('XACK', s, GROUP, entry)
      elseif not known or (started and rec[4] ~= known) then
        redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')
        if started then
          local d = {id, rec[5], rec[6], rec[7], rec[4], p, rec[8], entry}
          local asked = asked_of(job_key(id), rec[7])
          if asked then d[9], d[10], d[11] = '', '', asked end
          out[#out + 1] = d
        else  -- not started yet: leased as receive leases it
          local d = lean_delivery(p, entry, fields) or
            start(s, p, entry, fields, consumer, now, max_deliveries, ttl)
          if d then out[#out + 1] = d end
        end
      end
    end
  end
end
return out
