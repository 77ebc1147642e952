-- Remove a consumer that holds nothing from every band's group (a worker that stopped cleanly).
-- KEYS[1] prefix
-- ARGV: consumer
-- Returns how many groups it was removed from; a consumer still holding entries is kept.
local removed = 0
for _, p in ipairs(redis.call('ZRANGE', prefix .. 'priorities', 0, -1)) do
  local s = stream_key(p)
  if redis.call('EXISTS', s) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, GROUP)) do
      local name, pending = nil, nil
      for j = 1, #c, 2 do
        if c[j] == 'name' then name = c[j + 1] elseif c[j] == 'pending' then pending = c[j + 1] end
      end
      if name == ARGV[1] and pending == 0 then
        redis.call('XGROUP', 'DELCONSUMER', s, GROUP, ARGV[1])
        removed = removed + 1
      end
    end
  end
end
return removed
