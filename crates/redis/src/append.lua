#!lua name=genstream_v1
-- genstream's Redis functions, version 1. The library name and every function name
-- carry the version, so that replicas of two releases can run side by side during a
-- rolling deploy: a new release loads genstream_v2 next to this one.

-- Appends one event to a job's log, atomically:
--   assign the next seq, check the caps, build the SSE frame, XADD it with stream id
--   0-(seq+1), update the job hash, refresh TTLs, PUBLISH the frame.
-- There is never a seq without a log entry, nor an entry without a publish.
--
-- KEYS[1] job hash   KEYS[2] log stream   (both with the {streamId} hash tag)
-- ARGV[1] event name
-- ARGV[2] body JSON: {"event":NAME,"data":{...}}
-- ARGV[3] "1" if terminal
-- ARGV[4] max events   ARGV[5] max bytes (terminal events are exempt)
-- ARGV[6] TTL ms while running   ARGV[7] TTL ms once finished
-- ARGV[8] pub/sub channel
-- ARGV[9] job status to set if terminal   ARGV[10] now (ms since epoch)
-- ARGV[11] expected seq, or "" (the owner passes it so a retried append whose first
--          try did land is not appended twice)
-- ARGV[12] the appending replica's id; once a reaper has claimed the job (field
--          `reaper`), only that reaper may append
-- Returns {"ok", seq, frame} | {"dup", seq} | {"ended"} | {"full"} | {"missing"}
local function append(keys, args)
  local job, log = keys[1], keys[2]
  if redis.call('EXISTS', job) == 0 then return {'missing'} end
  local len = tonumber(redis.call('HGET', job, 'len') or '0')
  if args[11] ~= '' and len > tonumber(args[11]) then return {'dup', tonumber(args[11])} end
  if redis.call('HGET', job, 'ended') == '1' then return {'ended'} end
  local reaper = redis.call('HGET', job, 'reaper')
  if reaper and reaper ~= args[12] then return {'ended'} end
  local terminal = args[3] == '1'
  local seq = len
  local frame = 'id: ' .. seq .. '\nevent: ' .. args[1] .. '\ndata: {"seq":' .. seq .. ','
    .. string.sub(args[2], 2) .. '\n\n'
  local bytes = tonumber(redis.call('HGET', job, 'bytes') or '0')
  if not terminal and (seq + 1 > tonumber(args[4]) or bytes + #frame > tonumber(args[5])) then
    return {'full'}
  end
  redis.call('XADD', log, '0-' .. (seq + 1), 'f', frame)
  redis.call('HSET', job, 'len', seq + 1, 'bytes', bytes + #frame, 'progressAt', args[10])
  local ttl = args[6]
  if terminal then
    redis.call('HSET', job, 'ended', '1', 'status', args[9], 'finishedAt', args[10])
    ttl = args[7]
  end
  redis.call('PEXPIRE', job, ttl)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PUBLISH', args[8], frame)
  return {'ok', seq, frame}
end

-- Makes KEYS[1] (a conversation's latest-job pointer) point to ARGV[1] if it still
-- points to ARGV[2] ("" = absent). Returns 1 on success, 0 if someone else won.
local function claim(keys, args)
  local cur = redis.call('GET', keys[1])
  if (cur or '') ~= args[2] then return 0 end
  redis.call('SET', keys[1], args[1], 'PX', args[3])
  return 1
end

-- Claims a running job for the reaper ARGV[1], so that exactly one reaper saves its
-- partial answer and ends it, and its owner (if it was alive after all) appends nothing
-- more. Returns 1 if claimed, 0 if the job ended or another reaper has it.
local function claim_orphan(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then return 0 end
  if redis.call('HGET', keys[1], 'ended') == '1' then return 0 end
  if redis.call('HSETNX', keys[1], 'reaper', args[1]) == 0 then return 0 end
  return 1
end

-- Takes a running slot for job ARGV[1] in the user's running set KEYS[1] if it holds
-- fewer than ARGV[2] jobs (the caller first drops ids of jobs that ended). The count
-- and the add are one step, so racing requests on any replicas cannot pass the limit
-- (LibreChat #11840). Returns 1 if taken, 0 if the user is at the limit.
local function acquire_slot(keys, args)
  if redis.call('SCARD', keys[1]) >= tonumber(args[2]) then return 0 end
  redis.call('SADD', keys[1], args[1])
  return 1
end

-- Sliding-window log rate limit on KEYS[1], a sorted set of hit times (µs): at most
-- ARGV[1] hits in any ARGV[2] ms. Time is Redis's own TIME, never a replica's clock,
-- so replicas whose clocks disagree still share one window. ARGV[3] names this hit
-- (unique, so two hits in one microsecond are two members). A refused hit is not
-- counted, so a client that waits as told gets through.
-- Returns 0 if the hit is allowed (and counted), else the µs until the oldest hit in
-- the window leaves it.
local function rate_window(keys, args)
  local limit, period_ms = tonumber(args[1]), tonumber(args[2])
  local period = period_ms * 1000
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  -- The window is (now - period, now]: a hit exactly one period old has left it.
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now - period)
  if redis.call('ZCARD', keys[1]) < limit then
    redis.call('ZADD', keys[1], now, args[3])
    redis.call('PEXPIRE', keys[1], period_ms)
    return 0
  end
  local oldest = tonumber(redis.call('ZRANGE', keys[1], 0, 0, 'WITHSCORES')[2])
  return oldest + period - now
end

redis.register_function('genstream_acquire_slot_v1', acquire_slot)
redis.register_function('genstream_rate_window_v1', rate_window)
redis.register_function('genstream_append_v1', append)
redis.register_function('genstream_claim_orphan_v1', claim_orphan)
redis.register_function('genstream_claim_v1', claim)
