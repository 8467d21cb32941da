-- Take an idempotency key, or return what holds it: one round trip, atomic.
-- KEYS[1]: the record. ARGV[1]: this request's in-progress value. ARGV[2]: lock timeout, ms.
-- Returns nil when the key was free (this request now holds it until the lock
-- expires), else the stored value (another request in progress, or a response).
-- A crashed holder's key expires with its lock, so its retry finds the key free.
local current = redis.call('GET', KEYS[1])
if current then
    return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
