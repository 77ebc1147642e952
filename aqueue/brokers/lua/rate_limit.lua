-- Count one hit in the current window of Redis's own clock (windows aligned to the epoch), so
-- that every worker counts in the same window whatever its host's clock says; admit at most
-- `limit` per window.
-- KEYS[1] prefix
-- ARGV: key, limit, window length in ms
-- Returns 0 when admitted, else the ms until the next window.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local per = tonumber(ARGV[3])
local window = math.floor(now / per)
-- The window's length is in the key: limits on one key with windows of different lengths count
-- apart, though their windows' numbers may be equal (a year's and a leap year's, today).
local k = prefix .. 'rate:' .. ARGV[1] .. ':' .. ARGV[3] .. ':' .. string.format('%d', window)
local n = redis.call('INCR', k)
if n == 1 then redis.call('PEXPIRE', k, ARGV[3]) end  -- as given: a number this long would go as 1e+18
if n > tonumber(ARGV[2]) then return math.max((window + 1) * per - now, 1) end
return 0
