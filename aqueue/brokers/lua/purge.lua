-- Delete every dead letter and its record.
-- KEYS[1] prefix
-- Returns how many.
local dkey = prefix .. 'dead'
local ids = redis.call('ZRANGE', dkey, 0, -1)
for _, id in ipairs(ids) do redis.call('DEL', job_key(id)) end
redis.call('DEL', dkey)
return #ids
