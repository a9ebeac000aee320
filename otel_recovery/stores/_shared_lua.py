"""Lua scripts behind fleet-wide circuit breakers and retry budgets.

Every decision that several processes could race on runs as one script, atomically on the
Redis server: counting a failure and tripping, taking a half-open probe permit, recording a
probe's outcome, forcing a mode, withdrawing a retry. Times are passed in by the caller
(``Clock.wall()`` seconds) rather than read with ``TIME``, so a test's FakeClock drives the
shared state too; hosts' clocks only need to agree to well within a breaker's open time
(see :mod:`._shared_breaker`). Numbers travel back as strings: Redis truncates Lua numbers
to integers in replies.

Breaker layout under the store prefix ``P`` (one breaker name ``N``):

- ``P cb:N`` hash: ``st`` state, ``until`` open-until (wall s), ``to`` current open time,
  ``gen`` transition counter, ``why``/``at`` last transition, ``cf`` consecutive failures,
  ``fseq`` failures ever (orders successes against failures), ``ps`` probe successes,
  ``wc``/``wf``/``ws`` calls, failures and slow calls in the rate window.
- ``P cbw:N`` list: the rate window as ``"<second> <calls> <failures> <slow>"`` batches.
- ``P cbp:N`` sorted set: half-open permits, scored by lease expiry (wall s), so a prober
  that crashed gives its permit back when the lease runs out.
- ``P cbq:N:M`` string: the last push number applied for member ``M`` (one breaker in one
  process), so a push sent again after a timeout counts once (:mod:`._pushes`).

Budget layout: ``P rb:N`` hash with ``c<bucket>``/``r<bucket>`` call and retry counts per
``ttl / 10`` bucket, exactly like the local budget's ring, and ``w`` the bucket width they
are counted with (one ttl per name); ``P rbq:N:M`` as ``cbq``. Every
script refreshes the keys' expiry, so state of a service that is gone disappears by itself.
"""

from __future__ import annotations

from otel_recovery.stores._pushes import ONCE

__all__ = ["ACQUIRE", "BUDGET", "MANUAL", "PROBE", "PROBE_NOW", "RECORD", "VIEW_FIELDS"]

VIEW_FIELDS = ("st", "until", "to", "gen", "why", "cf", "fseq", "wc", "wf", "ws")
"""What every breaker script returns after ``granted``: the breaker as it now stands."""

# KEYS: hash, window list, permit set. ARGV[1..3] in every breaker script: now (wall s), base
# open time (s), key expiry (ms); script-specific arguments follow from ARGV[4].
_BREAKER = """
local K, W, P = KEYS[1], KEYS[2], KEYS[3]
local now, base_to, keep = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local st = redis.call('HGET', K, 'st') or 'closed'
local function num(field)
  return tonumber(redis.call('HGET', K, field) or '0')
end
local function enter(to_state, why)
  redis.call('HINCRBY', K, 'gen', 1)
  redis.call('HSET', K, 'st', to_state, 'why', why, 'at', ARGV[1], 'ps', 0)
  redis.call('DEL', P)
  if to_state ~= 'open' and to_state ~= 'forced_open' then
    redis.call('HSET', K, 'cf', 0, 'wc', 0, 'wf', 0, 'ws', 0)
    redis.call('DEL', W)
  end
  if to_state == 'closed' then redis.call('HSET', K, 'to', base_to) end
  st = to_state
end
local function trip(why, open_for)
  redis.call('HSET', K, 'until', tostring(now + open_for), 'to', tostring(open_for))
  enter('open', why)
end
local function current_to()
  return tonumber(redis.call('HGET', K, 'to') or base_to)
end
local function view(granted)
  for _, key in ipairs({K, W, P}) do redis.call('PEXPIRE', key, keep) end
  local h = redis.call('HMGET', K, 'st', 'until', 'to', 'gen', 'why', 'cf', 'fseq', 'wc', 'wf',
    'ws')
  return {granted, h[1] or 'closed', h[2] or '', h[3] or base_to, h[4] or '0', h[5] or '',
    h[6] or '0', h[7] or '0', h[8] or '0', h[9] or '0', h[10] or '0'}
end
"""

# KEYS[4]: the member's last push number. ARGV from 4: mode ('c' consecutive | 'r' rate),
# failure threshold, successes since the caller's last contact, the fseq that caller had
# seen, failures, slow calls, rate threshold, slow-call rate threshold, minimum calls, window
# kind ('count' | 'time'), window size, for a resync push: seconds this caller's own breaker
# is still open ('' = not open) and the reason; then the push number and how long it is
# remembered (ms).
RECORD = (
    _BREAKER
    + ONCE
    + """
if applied_before(KEYS[4], ARGV[17], ARGV[18]) then return view(1) end
local mode, threshold = ARGV[4], tonumber(ARGV[5])
local ok, seen, fail, slow = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  tonumber(ARGV[9])
local counting = st == 'closed' or st == 'metrics_only'
if counting and mode == 'c' then
  local cf, fseq = num('cf'), num('fseq')
  -- A caller's successes come after every failure it had seen: they clear those, and only
  -- those (failures that reached the store since stay counted).
  if ok > 0 and fseq - seen < cf then cf = math.max(0, fseq - seen) end
  cf, fseq = cf + fail, fseq + fail
  redis.call('HSET', K, 'cf', cf, 'fseq', fseq)
  if st == 'closed' and fail > 0 and cf >= threshold then
    trip('failure_threshold', current_to())
  end
elseif counting then
  local kind, size, sec = ARGV[13], tonumber(ARGV[14]), math.floor(now)
  local wc, wf, ws = num('wc'), num('wf'), num('ws')
  local function parse(entry)
    local t, c, f, s = string.match(entry, '^(%-?%d+) (%d+) (%d+) (%d+)$')
    return tonumber(t), tonumber(c), tonumber(f), tonumber(s)
  end
  local calls = ok + fail
  if calls > 0 then
    local tail = redis.call('LINDEX', W, -1)
    local t, c, f, s
    if tail and kind == 'time' then t, c, f, s = parse(tail) end
    if t == sec then
      redis.call('LSET', W, -1, sec .. ' ' .. (c + calls) .. ' ' .. (f + fail) .. ' ' .. (s + slow))
    else
      redis.call('RPUSH', W, sec .. ' ' .. calls .. ' ' .. fail .. ' ' .. slow)
    end
    wc, wf, ws = wc + calls, wf + fail, ws + slow
  end
  while true do
    local head = redis.call('LINDEX', W, 0)
    if not head then break end
    local t, c, f, s = parse(head)
    if kind == 'time' then
      if t > sec - size then break end
    elseif wc - c < size then
      -- The oldest batch straddles the window's edge: drop its share of the excess.
      local excess = wc - size
      if excess > 0 then
        local df, ds = math.floor(f * excess / c + 0.5), math.floor(s * excess / c + 0.5)
        redis.call('LSET', W, 0, t .. ' ' .. (c - excess) .. ' ' .. (f - df) .. ' ' .. (s - ds))
        wc, wf, ws = wc - excess, wf - df, ws - ds
      end
      break
    end
    redis.call('LPOP', W)
    wc, wf, ws = wc - c, wf - f, ws - s
  end
  redis.call('HSET', K, 'wc', wc, 'wf', wf, 'ws', ws)
  if st == 'closed' and wc > 0 and wc >= tonumber(ARGV[12]) then
    if wf / wc >= tonumber(ARGV[10]) then
      trip('failure_rate', current_to())
    elseif ws / wc >= tonumber(ARGV[11]) then
      trip('slow_call_rate', current_to())
    end
  end
end
if ARGV[15] ~= '' and st == 'closed' then
  trip(ARGV[16], current_to())
  redis.call('HSET', K, 'until', tostring(now + tonumber(ARGV[15])))
end
return view(1)
"""
)

# ARGV from 4: permit id, permits allowed in half-open, lease seconds.
ACQUIRE = (
    _BREAKER
    + """
if st == 'closed' or st == 'disabled' or st == 'metrics_only' then return view(1) end
if st == 'forced_open' then return view(0) end
if st == 'open' then
  if now < tonumber(redis.call('HGET', K, 'until') or '0') then return view(0) end
  enter('half_open', 'timeout_elapsed')
end
redis.call('ZREMRANGEBYSCORE', P, '-inf', ARGV[1])
if redis.call('ZCARD', P) < tonumber(ARGV[5]) then
  redis.call('ZADD', P, tostring(now + tonumber(ARGV[6])), ARGV[4])
  return view(1)
end
return view(0)
"""
)

# ARGV from 4: permit id, generation it was granted in, outcome ('ok' | 'fail' | 'slow' |
# 'release'), success threshold, open-time multiplier, maximum open time.
PROBE = (
    _BREAKER
    + """
redis.call('ZREM', P, ARGV[4])
if st ~= 'half_open' or (redis.call('HGET', K, 'gen') or '0') ~= ARGV[5] then return view(1) end
local outcome = ARGV[6]
if outcome == 'fail' or outcome == 'slow' then
  local grown = math.min(current_to() * tonumber(ARGV[8]), tonumber(ARGV[9]))
  trip(outcome == 'fail' and 'probe_failed' or 'probe_slow', grown)
elseif outcome == 'ok' then
  if redis.call('HINCRBY', K, 'ps', 1) >= tonumber(ARGV[7]) then
    enter('closed', 'probes_succeeded')
  end
end
return view(1)
"""
)

# ARGV from 4: target state ('forced_open' | 'disabled' | 'metrics_only' | 'closed'), reason.
MANUAL = (
    _BREAKER
    + """
local target = ARGV[4]
if target == 'closed' and st == 'closed' then
  redis.call('HSET', K, 'cf', 0, 'wc', 0, 'wf', 0, 'ws', 0, 'to', base_to)
  redis.call('DEL', W)
elseif st ~= target then
  enter(target, ARGV[5])
end
return view(1)
"""
)

# ARGV from 4: reason. Ends the open time of an open breaker (``probe_now``): granted is 1
# if it moved to half-open.
PROBE_NOW = (
    _BREAKER
    + """
if st ~= 'open' then return view(0) end
enter('half_open', ARGV[4])
return view(1)
"""
)

# KEYS[1] = budget hash, KEYS[2] = the member's last push number. ARGV: now (wall s), bucket
# width (s), ratio, floor (min_per_second * ttl), deposits, 1 to withdraw one retry (0 to only
# deposit and read), retries to add without a check (a resync pushing retries granted
# locally), key expiry (ms), push number,
# how long it is remembered (ms). Returns {granted, calls in window, retries in window,
# allowance left, '', first}: ``first`` is -1 for a push applied now; for a push applied
# before (it only reads) it is 1 if that first copy's withdrawal was granted, else 0. The
# member's number key holds "<number>:<granted>".
# The hash's ``w`` field is the bucket width its buckets were counted with: while any of them
# is live, a caller with another width changes nothing and gets {0, 0, 0, '0', that width};
# once they have all expired, the name is the new width's.
BUDGET = """
local B, now, width = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local stored = redis.call('HGET', B, 'w')
if stored and stored ~= width then
  local oldest_other = math.floor(now / tonumber(stored)) - 9
  local fields = redis.call('HKEYS', B)
  for _, field in ipairs(fields) do
    if field ~= 'w' and tonumber(string.sub(field, 2)) >= oldest_other then
      return {0, 0, 0, '0', stored}
    end
  end
  redis.call('DEL', B)
  stored = false
end
if not stored then redis.call('HSET', B, 'w', width) end
local bucket = math.floor(now / tonumber(width))
local oldest = bucket - 9
local deposits, forced, spend = tonumber(ARGV[5]), tonumber(ARGV[7]), ARGV[6]
local first = -1
local last = redis.call('GET', KEYS[2])
if ARGV[9] ~= '' and last then
  local number, granted_then = string.match(last, '^(%d+):(%d)$')
  if number and tonumber(number) >= tonumber(ARGV[9]) then
    first, deposits, forced, spend = tonumber(granted_then), 0, 0, '0'
  end
end
if deposits > 0 then redis.call('HINCRBY', B, 'c' .. bucket, deposits) end
if forced ~= 0 then redis.call('HINCRBY', B, 'r' .. bucket, forced) end
local calls, retries = 0, 0
local all = redis.call('HGETALL', B)
for i = 1, #all, 2 do
  local field = all[i]
  local index = tonumber(string.sub(field, 2))
  if field == 'w' then
    -- the width, not a bucket
  elseif index < oldest then
    redis.call('HDEL', B, field)
  elseif string.sub(field, 1, 1) == 'c' then
    calls = calls + tonumber(all[i + 1])
  else
    retries = retries + tonumber(all[i + 1])
  end
end
local allowance = tonumber(ARGV[3]) * calls + tonumber(ARGV[4]) - retries
local granted = 0
if spend == '1' and allowance >= 1 then
  redis.call('HINCRBY', B, 'r' .. bucket, 1)
  retries, allowance, granted = retries + 1, allowance - 1, 1
end
redis.call('PEXPIRE', B, ARGV[8])
if first == -1 and ARGV[9] ~= '' then
  redis.call('SET', KEYS[2], ARGV[9] .. ':' .. granted, 'PX', ARGV[10])
end
return {granted, calls, retries, tostring(allowance), '', first}
"""
