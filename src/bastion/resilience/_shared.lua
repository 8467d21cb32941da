-- Record a circuit transition in the shared hash and publish it, in one round trip.
-- Only a transition later than the recorded one is written ("latest since wins"),
-- so two instances racing to record never leave the older state behind.
--
-- KEYS[1]  the hash of circuits ({prefix}circuits)
-- ARGV[1]  the circuit's name (the hash field)
-- ARGV[2]  the transition, compact JSON: {"c", "s", "t", "u", "i"}
-- ARGV[3]  its "since" (epoch seconds), as a number
-- ARGV[4]  the channel to publish it on ({prefix}circuits)
-- Returns 1 when written and published, 0 when a later transition was recorded.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, recorded = pcall(cjson.decode, current)
  if ok and type(recorded) == 'table' and tonumber(recorded.t)
      and tonumber(recorded.t) >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
