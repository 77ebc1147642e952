-- Count one hit in a fixed window; admit at most `limit` per window.
-- KEYS[1] prefix
-- ARGV: key, window index, limit, window length in ms
-- Returns 1 when admitted, 0 when over the limit.
local k = prefix .. 'rate:' .. ARGV[1] .. ':' .. ARGV[2]
local n = redis.call('INCR', k)
if n == 1 then redis.call('PEXPIRE', k, ARGV[4]) end
if n > tonumber(ARGV[3]) then return 0 end
return 1
