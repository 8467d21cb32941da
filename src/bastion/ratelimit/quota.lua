-- Quota counters: consume, read, refund or reset several counters of one subject atomically.
--
-- Each counter is a hash: w = the index of the period it counts, n = units used in
-- it. A counter whose w is not the current period's index counts 0: the period
-- renewed, and the stale hash is overwritten on the next consumption (its TTL has
-- usually removed it by then). Periods are UTC calendar days and months, or fixed
-- windows of N seconds aligned on the Unix epoch; the month is computed from the
-- day number with civil-from-days arithmetic (H. Hinnant, "chrono-Compatible
-- Low-Level Date Algorithms"), so every instance agrees on Redis time.
--
-- KEYS[k]        the hash of counter k (all keys share the subject's hash tag)
-- ARGV[1]        consume | usage | refund | reset
-- ARGV[2]        now in epoch seconds, or '' for Redis TIME (an explicit now is for tests)
-- ARGV[3]        cost, a positive integer (consume, refund)
-- ARGV[1 + 3k]   period of counter k: 'day', 'month' or a number of seconds
-- ARGV[2 + 3k]   limit of counter k, a non-negative integer
-- ARGV[3 + 3k]   refund only: the end of the period the units were consumed in, or ''
--                for the current one; a counter whose period has moved on is left alone
--
-- Returns {allowed (1 or 0), now, first refusing counter (1-based, 0 for none),
--          used_1, end_1, used_2, end_2, ...}; now and the period ends are strings
-- ('%.17g') because Redis truncates Lua numbers to integers in replies.
-- consume takes cost from every counter only when every counter has room for it;
-- refund gives cost back to the counters' periods, never below 0.

local function fmt(x)
  return string.format('%.17g', x)
end

-- Days since 1970-01-01 of the civil date y-m-d (proleptic Gregorian).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- Year and month of the day that is z days after 1970-01-01.
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- The index of the period holding now, and the epoch second it ends at.
local function window(period, now)
  if period == 'day' then
    local i = math.floor(now / 86400)
    return i, (i + 1) * 86400
  elseif period == 'month' then
    local y, m = civil_from_days(math.floor(now / 86400))
    local i = y * 12 + m - 1
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    return i, days_from_civil(y, m, 1) * 86400
  end
  local seconds = tonumber(period)
  local i = math.floor(now / seconds)
  return i, (i + 1) * seconds
end

local op = ARGV[1]
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local cost = tonumber(ARGV[3])

local used, ends, index = {}, {}, {}
local first = 0
for k = 1, #KEYS do
  local i, e = window(ARGV[1 + 3 * k], now)
  local u = 0
  if op ~= 'reset' then
    local state = redis.call('HMGET', KEYS[k], 'w', 'n')
    if tonumber(state[1]) == i then u = tonumber(state[2]) or 0 end
  end
  used[k], ends[k], index[k] = u, e, i
  if op == 'consume' and first == 0 and u + cost > tonumber(ARGV[2 + 3 * k]) then
    first = k
  end
end

if op == 'reset' then
  redis.call('DEL', unpack(KEYS))
elseif op == 'consume' and first == 0 then
  for k = 1, #KEYS do
    used[k] = used[k] + cost
    redis.call('HSET', KEYS[k], 'w', fmt(index[k]), 'n', used[k])
    -- Relative to the script's now (an explicit now in tests may be far from the
    -- server's clock); a second of slack, as the hash is useless after its period.
    redis.call('PEXPIRE', KEYS[k], math.ceil((ends[k] - now) * 1000) + 1000)
  end
elseif op == 'refund' then
  for k = 1, #KEYS do
    local consumed_in = tonumber(ARGV[3 + 3 * k])
    if used[k] > 0 and (consumed_in == nil or consumed_in == ends[k]) then
      used[k] = math.max(0, used[k] - cost)
      -- HSET keeps the TTL set when the period's first unit was consumed.
      redis.call('HSET', KEYS[k], 'n', used[k])
    end
  end
end

local reply = {first == 0 and 1 or 0, fmt(now), first}
for k = 1, #KEYS do
  reply[#reply + 1] = used[k]
  reply[#reply + 1] = fmt(ends[k])
end
return reply
