-- decide.lua: one rate-limit decision of `cost` units against every rule of a
-- policy, atomically and all-or-nothing (bastion.ratelimit._redis.RedisStore).
--
-- KEYS[i]   the state of rule i; every key of one call shares one hash tag.
-- ARGV[1]   now in seconds ('' = Redis TIME; an explicit value is for tests only)
-- ARGV[2]   cost, a positive integer no larger than any rule's burst
-- ARGV[3]   a member prefix unique to this call ('' when no rule is a sliding log)
-- ARGV[4..] three per rule:
--             't' T tau   token bucket (GCRA): T = period / rate, tau = T * burst
--             'w' W N     sliding window counter: W = period * burst / rate, N = burst
--             'l' W N     sliding log, exact: the same W and N
--
-- Reply: {allowed (1|0), retry_after, remaining_1, reset_after_1, ...}. Counts are
-- integers; durations are strings ('%.17g', exact doubles), since a Lua number in
-- a reply is truncated to an integer.
--
-- Every rule is checked before any is consumed: a rejected call writes nothing
-- but the expiry of a log's entries that have left its window.
--
-- State: token bucket, a string (the theoretical arrival time, TAT, absolute)
-- expiring when the bucket is full again; window counter, a hash {w: window index, c: count in
-- window w, p: count in window w - 1} expiring when window w + 1 ends; log, a
-- sorted set of one member per admitted unit scored by its time, expiring W after
-- the newest.

local EPS = 1e-9

local function fmt(x)
  return string.format('%.17g', x)
end

local function ms(seconds)
  local value = math.ceil(seconds * 1000)
  if value < 1 then
    return 1
  end
  return value
end

local now
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local cost = tonumber(ARGV[2])
local nonce = ARGV[3]

local rules = {}
local allowed = true
local retry_after = 0

-- Pass 1: read every rule's state and decide; nothing is consumed yet.
for i = 1, #KEYS do
  local at = 1 + i * 3
  local kind = ARGV[at]
  local a = tonumber(ARGV[at + 1])
  local b = tonumber(ARGV[at + 2])
  local key = KEYS[i]
  local rule = { kind = kind, key = key, a = a, b = b }
  local wait = nil

  if kind == 't' then
    local T, tau = a, b
    -- In how far the TAT runs ahead of now, not in absolute times: Redis TIME is
    -- about 1.7e9 s, where a double resolves only 2.4e-7 s, and `(tat + T) - now`
    -- would carry that error into every comparison; a fresh key's `ahead` is an
    -- exact 0, and the subtraction of two close times is exact.
    local ahead = 0
    local stored = redis.call('GET', key)
    if stored then
      ahead = tonumber(stored) - now
      if ahead < 0 then
        ahead = 0
      end
    end
    local new = ahead + T * cost
    rule.ahead = ahead
    rule.new = new
    if new > tau + EPS then
      wait = new - tau
    end
  elseif kind == 'w' then
    local W, N = a, b
    local index = math.floor(now / W)
    -- Clamped: now / W and index * W round apart, and a fraction a hair outside
    -- [0, 1] would weigh the previous window wrongly.
    local fraction = (now - index * W) / W
    if fraction < 0 then
      fraction = 0
    elseif fraction > 1 then
      fraction = 1
    end
    local stored = redis.call('HMGET', key, 'w', 'c', 'p')
    local window = tonumber(stored[1])
    local cur, prev = 0, 0
    if window == index then
      cur = tonumber(stored[2]) or 0
      prev = tonumber(stored[3]) or 0
    elseif window == index - 1 then
      prev = tonumber(stored[2]) or 0
    end
    local estimate = prev * (1 - fraction) + cur
    rule.index = index
    rule.cur = cur
    rule.prev = prev
    rule.estimate = estimate
    local excess = estimate + cost - N
    if excess > EPS then
      if cur + cost <= N then
        -- Within window `index` the estimate falls linearly, by prev per W, to
        -- cur: the wait is the excess over what prev's decay pays back.
        wait = excess * W / prev
      else
        -- Not before window index + 1, where the estimate falls from cur to 0.
        wait = ((index + 1) * W - now) + W * (cur + cost - N) / cur
      end
    end
  elseif kind == 'l' then
    local W, N = a, b
    -- The log holds (now - W, now]; EPS so that asking again exactly
    -- retry_after later finds the entry gone despite rounding.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - W + EPS))
    local count = redis.call('ZCARD', key)
    rule.count = count
    if count + cost > N then
      local oldest = redis.call('ZRANGE', key, count + cost - N - 1, count + cost - N - 1,
        'WITHSCORES')
      wait = tonumber(oldest[2]) + W - now
    end
  else
    return redis.error_reply('ERR decide.lua: unknown rule kind ' .. tostring(kind))
  end

  if wait then
    allowed = false
    if wait > retry_after then
      retry_after = wait
    end
  end
  rules[i] = rule
end

-- Pass 2: consume from every rule when all admitted; report each rule's state.
local reply = { allowed and 1 or 0, fmt(allowed and 0 or retry_after) }
for i = 1, #rules do
  local rule = rules[i]
  local remaining, reset_after
  if rule.kind == 't' then
    local T, tau = rule.a, rule.b
    if allowed then
      redis.call('SET', rule.key, fmt(now + rule.new), 'PX', ms(rule.new))
      remaining = math.floor((tau - rule.new) / T + EPS)
      reset_after = rule.new
    else
      remaining = math.floor((tau - rule.ahead) / T + EPS)
      reset_after = rule.ahead
    end
  elseif rule.kind == 'w' then
    local W, N = rule.a, rule.b
    local cur = rule.cur
    if allowed then
      cur = cur + cost
      redis.call('HSET', rule.key, 'w', fmt(rule.index), 'c', cur, 'p', rule.prev)
      redis.call('PEXPIRE', rule.key, ms((rule.index + 2) * W - now))
      remaining = math.floor(N - rule.estimate - cost + EPS)
    else
      remaining = math.floor(N - rule.estimate + EPS)
    end
    if cur > 0 then
      reset_after = (rule.index + 2) * W - now
    elseif rule.prev > 0 then
      reset_after = (rule.index + 1) * W - now
    else
      reset_after = 0
    end
  else
    local W, N = rule.a, rule.b
    local count = rule.count
    if allowed then
      local score = fmt(now)
      if cost == 1 then
        redis.call('ZADD', rule.key, score, nonce .. ':1')
      else
        local members = {}
        for unit = 1, cost do
          members[#members + 1] = score
          members[#members + 1] = nonce .. ':' .. unit
          -- unpack() has a bounded stack: add in slices.
          if #members >= 1000 then
            redis.call('ZADD', rule.key, unpack(members))
            members = {}
          end
        end
        if #members > 0 then
          redis.call('ZADD', rule.key, unpack(members))
        end
      end
      redis.call('PEXPIRE', rule.key, ms(W))
      remaining = N - count - cost
      reset_after = W
    else
      remaining = N - count
      if count > 0 then
        local newest = redis.call('ZRANGE', rule.key, -1, -1, 'WITHSCORES')
        reset_after = tonumber(newest[2]) + W - now
      else
        reset_after = 0
      end
    end
  end
  if remaining < 0 then
    remaining = 0
  end
  reply[#reply + 1] = remaining
  reply[#reply + 1] = fmt(reset_after)
end
return reply
