-- Release a lock, only for its holder, and wake whoever waits for it.
-- KEYS[1] prefix
-- ARGV: name, token
local key = prefix .. 'lock:' .. ARGV[1]
if redis.call('GET', key) ~= ARGV[2] then return 0 end
redis.call('DEL', key)
redis.pcall('PUBLISH', key, 'released')  -- refused (no channel rights): waiters look again
return 1
