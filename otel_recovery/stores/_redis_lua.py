"""The Lua scripts of the Redis store, and the record format they write.

Each script runs atomically on the server, so "read the head, check the expected version, write
the next version, prune" cannot interleave with another client's, and a client killed mid-call
either sent the whole EVALSHA or nothing. Layout under the store's prefix ``P``:

- ``P i:<key>`` hash: ``h`` = last version ever assigned (never decreases, survives delete),
  ``lo`` = lowest version that may still exist. It expires with its longest-lived version, but
  never sooner than the tombstone time (7 days) after the last write or delete.
- ``P v:<key>:<n>`` string: one version, packed as ``OTR1\\n<n>\\n<created>\\n<expires or
  empty>\\n<encoding>\\n<data>``; expires natively (``PX``) when the record has a TTL.
- ``P c:<namespace>`` hash: counters; ``P b:<batch id>``: "this batch was applied" markers.

Version keys are named inside the scripts (not passed as KEYS), which is fine on a standalone
or Sentinel-managed Redis; Redis Cluster is not supported by this store.
"""

from __future__ import annotations

__all__ = ["DELETE", "GET_LATEST", "INCR", "MAGIC", "PUT"]

MAGIC = b"OTR1"

# KEYS[1] = index hash. ARGV: version-key prefix, expected ('' = none), created, expires
# ('' = none), ttl ms (0 = none), encoding, data, max versions, tombstone ms.
# Returns {1, version} or {0, latest live version} on a compare-and-set conflict.
PUT = """
local idx, vp = KEYS[1], ARGV[1]
local maxv, tomb = tonumber(ARGV[8]), tonumber(ARGV[9])
local head = tonumber(redis.call('HGET', idx, 'h') or '0')
local lo = tonumber(redis.call('HGET', idx, 'lo') or '1')
local latest = 0
for n = head, lo, -1 do
  if redis.call('EXISTS', vp .. n) == 1 then latest = n; break end
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= latest then return {0, latest} end
local version = head + 1
local value = 'OTR1\\n' .. version .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4] .. '\\n'
  .. ARGV[6] .. '\\n' .. ARGV[7]
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('SET', vp .. version, value, 'PX', ttl)
else
  redis.call('SET', vp .. version, value)
end
local newlo = version - maxv + 1
if newlo < lo then newlo = lo end
for n = lo, newlo - 1 do redis.call('DEL', vp .. n) end
redis.call('HSET', idx, 'h', version, 'lo', newlo)
local keep = tomb
for n = version, newlo, -1 do
  local p = redis.call('PTTL', vp .. n)
  if p == -1 then keep = -1; break end
  if p > keep then keep = p end
end
if keep == -1 then redis.call('PERSIST', idx) else redis.call('PEXPIRE', idx, keep) end
return {1, version}
"""

# KEYS[1] = index hash. ARGV: version-key prefix. The packed latest live version, or false.
GET_LATEST = """
local head = tonumber(redis.call('HGET', KEYS[1], 'h') or '0')
local lo = tonumber(redis.call('HGET', KEYS[1], 'lo') or '1')
for n = head, lo, -1 do
  local v = redis.call('GET', ARGV[1] .. n)
  if v then return v end
end
return false
"""

# KEYS[1] = index hash. ARGV: version-key prefix, tombstone ms. Returns how many were live.
DELETE = """
local head = tonumber(redis.call('HGET', KEYS[1], 'h') or '0')
local lo = tonumber(redis.call('HGET', KEYS[1], 'lo') or '1')
local deleted = 0
for n = lo, head do deleted = deleted + redis.call('DEL', ARGV[1] .. n) end
if head > 0 then
  redis.call('HSET', KEYS[1], 'lo', head + 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return deleted
"""

# KEYS[1] = counter hash, KEYS[2] (optional) = batch marker. ARGV: marker ttl s, then
# key, amount pairs. Returns 1 if applied, 0 if the batch had been applied already.
INCR = """
if #KEYS == 2 then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
end
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
