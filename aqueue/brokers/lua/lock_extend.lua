-- Extend a lock, only for its holder.
-- KEYS[1] prefix
-- ARGV: name, token, ttl_ms
local key = prefix .. 'lock:' .. ARGV[1]
if redis.call('GET', key) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', key, ARGV[3])
return 1
