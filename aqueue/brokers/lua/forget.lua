-- Remove consumers that hold nothing from every band's group (a worker that stopped cleanly).
-- KEYS[1] prefix
-- ARGV: the consumers (a worker's own name and its waiting name, see take.lua)
-- Returns how many consumers it removed, summed over the groups; one still holding entries is kept.
local names = {}
for _, name in ipairs(ARGV) do names[name] = true end
local removed = 0
for _, p in ipairs(redis.call('ZRANGE', prefix .. 'priorities', 0, -1)) do
  local s = stream_key(p)
  if redis.call('EXISTS', s) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, GROUP)) do
      local name, pending = nil, nil
      for j = 1, #c, 2 do
        if c[j] == 'name' then name = c[j + 1] elseif c[j] == 'pending' then pending = c[j + 1] end
      end
      if names[name] and pending == 0 then
        redis.call('XGROUP', 'DELCONSUMER', s, GROUP, name)
        removed = removed + 1
      end
    end
  end
end
return removed
