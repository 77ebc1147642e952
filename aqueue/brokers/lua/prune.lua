-- Forget index entries of jobs whose records expired.
-- KEYS[1] prefix
-- ARGV: offset, limit (a page of the index, oldest first)
-- Returns {removed, entries looked at}.
local ikey = prefix .. 'index'
local ids = redis.call('ZRANGE', ikey, ARGV[1], tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', job_key(id)) == 0 then
    redis.call('ZREM', ikey, id)
    removed = removed + 1
  end
end
return {removed, #ids}
