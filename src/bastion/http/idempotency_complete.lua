-- Store the response of the request holding an idempotency key, for the replay window.
-- KEYS[1]: the record. ARGV[1]: the holder's in-progress value (its token inside).
-- ARGV[2]: the complete record. ARGV[3]: its time to live, ms.
-- Returns 1 when stored, 0 when the request no longer holds the key (its lock
-- expired and another request took it): that one's outcome stands.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'XX', 'PX', ARGV[3])
return 1
