-- Lease what a blocking XREADGROUP, sent just before this script on the same connection, handed
-- to the consumer's waiting name: the script runs as the read returns, with no round trip
-- between. Entries are moved to the consumer itself (XCLAIM JUSTID: their delivery count stays).
-- Lean entries are its jobs as they are; any other entry is left to the start script, which
-- writes the start at the worker's own time.
-- Jobs are leased as receive leases them, highest band first, then oldest first. A band above
-- every band the read took from is read here first: a read that blocked returns the stream that
-- woke it (Redis 7.0), and one enqueue may fill several. XREADGROUP's COUNT is per stream, so
-- more than `count` may have been read: those past it are handed back unread (see unread).
-- KEYS[1] prefix
-- ARGV: consumer, its waiting name, count.
-- Returns {bands, {band, entry id, ...} to start, delivery, ...}: the bands as the script sees
-- them, so a consumer learns new ones.
local consumer, waiting, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local all = bands()
local to_start = {}
local out = {all, to_start}
local kept = 0

local function keep(p, entry, fields)
  kept = kept + 1
  local d = lean_delivery(p, entry, fields)
  if d then
    out[#out + 1] = d
  else
    to_start[#to_start + 1] = p
    to_start[#to_start + 1] = entry
  end
end

-- What the read handed to the waiting name, per band; the first band it took from.
local read, top = {}, nil
for i, p in ipairs(all) do
  -- No group (the server lost its data): nothing was read; the receive script recreates it.
  local rows = redis.pcall('XPENDING', stream_key(p), GROUP, '-', '+', 2 * count, waiting)
  if not rows.err and #rows > 0 then
    read[i] = rows
    top = top or i
  end
end

if top then
  for i, p in ipairs(all) do
    local s = stream_key(p)
    if i < top and kept < count then  -- a band above what was read: its ready jobs come first
      local reply = redis.pcall('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', count - kept,
        'STREAMS', s, '>')  -- no group: as above
      if reply and not reply.err and reply[1] then
        for _, e in ipairs(reply[1][2]) do keep(p, e[1], e[2]) end
      end
    elseif read[i] then
      local past = {}
      for _, row in ipairs(read[i]) do
        local entry = row[1]
        local found = redis.call('XRANGE', s, entry, entry)
        if kept >= count then
          past[#past + 1] = {entry, found[1] and found[1][2]}
        elseif #found == 0 then
          redis.call('XACK', s, GROUP, entry)  -- deleted meanwhile: nothing to run
        else
          redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')
          keep(p, entry, found[1][2])
        end
      end
      if #past > 0 then unread(s, p, past) end
    end
  end
end
return out
