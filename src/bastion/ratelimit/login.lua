-- Login throttling: failed attempts per client IP, consecutive failures and lockout per identifier.
--
-- Every call touches one subject, so its one key carries that subject's hash tag:
-- an IP's failures and an identifier's lockout are counted independently, and no
-- call needs both atomically (check and record_failure send one of each together).
--
-- KEYS[1]  the subject's key:
--          ip_*  a list of the IP's latest failure times, newest first, at most max N long
--          id_*, unlock  a hash: f = consecutive failures, l = when the last was counted,
--          u = end of the latest lockout (kept after it ends, to remember repetitions),
--          r = that lockout's repetition (0 for the first). Forgetting is decided from
--          these times, not left to the TTL, which only removes what is forgotten.
-- ARGV[1]  ip_check | ip_fail | id_check | id_fail | id_success | unlock
-- ARGV[2]  now in epoch seconds, or '' for Redis TIME (an explicit now is for tests)
-- ip_*:    ARGV[3] largest N, ARGV[4] longest window W, then (W, N) per limit
-- id_fail: ARGV[3] threshold, ARGV[4] first lockout's duration, ARGV[5] growth,
--          ARGV[6] longest lockout, ARGV[7] memory (seconds repetitions and failures are kept)
--
-- Times travel as strings ('%.17g'): Redis truncates Lua numbers to integers in replies.

local function fmt(x)
  return string.format('%.17g', x)
end

local function ms(seconds)
  return math.max(1, math.ceil(seconds * 1000))
end

local op = ARGV[1]
local key = KEYS[1]
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end

if op == 'ip_check' or op == 'ip_fail' then
  -- An exact sliding log, kept to the newest max N failures: a limit of N per W
  -- refuses once N of them are younger than W, and the N-th newest is the one
  -- whose ageing out lets the IP try again, so older entries are never needed.
  local most, longest = tonumber(ARGV[3]), tonumber(ARGV[4])
  if op == 'ip_fail' then
    redis.call('LPUSH', key, fmt(now))
    redis.call('LTRIM', key, 0, most - 1)
    redis.call('PEXPIRE', key, ms(longest))
  end
  local times = {}
  for _, raw in ipairs(redis.call('LRANGE', key, 0, most - 1)) do
    times[#times + 1] = tonumber(raw)
  end
  -- Newest first; sorted again in case Redis's clock stepped back.
  table.sort(times, function(a, b) return a > b end)
  -- Per limit: {failures in the window, seconds until one more is allowed (0 when
  -- it is now), seconds until the window holds none}.
  local reply = {fmt(now)}
  local j = 5
  while ARGV[j] do
    local w, n = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
    local count = 0
    for _, t in ipairs(times) do
      if t > now - w then count = count + 1 end
    end
    local retry, reset = 0, 0
    if count > 0 then reset = times[1] + w - now end
    if count >= n then retry = times[n] + w - now end
    reply[#reply + 1] = count
    reply[#reply + 1] = fmt(retry)
    reply[#reply + 1] = fmt(reset)
    j = j + 2
  end
  return reply
end

local state = redis.call('HMGET', key, 'f', 'u', 'r', 'l')
local failures = tonumber(state[1]) or 0
local locked_until = tonumber(state[2]) or 0
local repetition = tonumber(state[3]) or -1
local last_failure = tonumber(state[4]) or 0

if op == 'id_check' then
  return {fmt(now), fmt(math.max(0, locked_until - now))}
end

if op == 'unlock' then
  redis.call('DEL', key)
  return locked_until > now and 1 or 0
end

if op == 'id_success' then
  -- Only the consecutive failures: the repetitions stay, so an attacker who keeps
  -- at it after the owner logs in meets the longer lockout.
  if failures > 0 then
    redis.call('HDEL', key, 'f', 'l')
    if redis.call('HLEN', key) == 0 then redis.call('DEL', key) end
  end
  return failures
end

-- id_fail. Returns {status, now, consecutive failures, seconds locked from now,
-- repetition of the latest lockout (-1 for none), end of that lockout}; status is
-- 0 counted, 1 this failure locked the identifier, 2 already locked (not counted:
-- failures that raced past check() while another locked it must not lock again).
local threshold, duration = tonumber(ARGV[3]), tonumber(ARGV[4])
local growth, longest, memory = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if locked_until > now then
  return {2, fmt(now), failures, fmt(locked_until - now), repetition, fmt(locked_until)}
end
if repetition >= 0 and now - locked_until > memory then
  repetition = -1
end
if now - last_failure > memory then
  failures = 0
end
failures = failures + 1
if failures >= threshold then
  repetition = repetition + 1
  -- growth ^ repetition may overflow to inf; the cap still applies.
  local length = math.min(longest, duration * growth ^ repetition)
  locked_until = now + length
  redis.call('HSET', key, 'f', 0, 'l', fmt(now), 'u', fmt(locked_until), 'r', repetition)
  -- A second of slack: the times above decide what is forgotten, never the TTL.
  redis.call('PEXPIRE', key, ms(length + memory + 1))
  return {1, fmt(now), 0, fmt(length), repetition, fmt(locked_until)}
end
redis.call('HSET', key, 'f', failures, 'l', fmt(now))
-- Kept while the failures are remembered, and the latest lockout's repetition too.
local keep = memory
if repetition >= 0 then keep = math.max(keep, locked_until + memory - now) end
redis.call('PEXPIRE', key, ms(keep + 1))
return {0, fmt(now), failures, '0', repetition, fmt(locked_until)}
