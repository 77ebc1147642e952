-- The states of jobs as they stand, as records.lua shows them (a job that a lean delivery runs
-- is shown running), without reading the rest of their records: a state is a few bytes where a
-- record holds the payload and the result.
-- KEYS[1] prefix
-- ARGV: job ids
-- Returns per job its state, or false when it has no record.
local out = {}
for i = 1, #ARGV do
  local jk = job_key(ARGV[i])
  local state = redis.call('HGET', jk, 'state')
  if not state and redis.call('EXISTS', jk) == 1 then
    state = ''  -- a record that has no state, which aqueue never writes: the caller says so
  elseif state == 'pending' and lean_running(jk) then
    state = 'running'
  end
  out[i] = state
end
return out
