-- Give up an idempotency key without storing a response, so a retry executes again.
-- KEYS[1]: the record. ARGV[1]: the holder's in-progress value (its token inside).
-- Returns 1 when released, 0 when the request no longer held the key.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
return 1
