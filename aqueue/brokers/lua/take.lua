-- Lease what a blocking XREADGROUP, sent just before this script on the same connection, handed
-- to the consumer's waiting name: the script runs as the read returns, with no round trip
-- between. Entries are moved to the consumer itself (XCLAIM JUSTID: their delivery count stays).
-- Lean entries are its jobs as they are; any other entry is left to the start script, which
-- writes the start at the worker's own time.
-- KEYS[1] prefix
-- ARGV: consumer, its waiting name, count. XREADGROUP's COUNT is per stream, so more than `count`
--       may have been read: those past `count` are put back on their stream for any worker.
-- Returns {bands, {band, entry id, ...} to start, delivery, ...}: the bands as the script sees
-- them, so a consumer learns new ones.
local consumer, waiting, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local all = bands()
local to_start = {}
local out = {all, to_start}
local kept = 0
for _, p in ipairs(all) do
  local s = stream_key(p)
  -- No group (the server lost its data): nothing was read; the receive script recreates it.
  local rows = redis.pcall('XPENDING', s, GROUP, '-', '+', 2 * count, waiting)
  if not rows.err then
    for _, row in ipairs(rows) do
      local entry = row[1]
      local found = redis.call('XRANGE', s, entry, entry)
      if #found == 0 then
        redis.call('XACK', s, GROUP, entry)  -- deleted meanwhile: nothing to run
      elseif kept >= count then
        put_back(s, p, entry, found[1][2])
      else
        kept = kept + 1
        redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')
        local d = lean_delivery(p, entry, found[1][2])
        if d then
          out[#out + 1] = d
        else
          to_start[#to_start + 1] = p
          to_start[#to_start + 1] = entry
        end
      end
    end
  end
end
return out
