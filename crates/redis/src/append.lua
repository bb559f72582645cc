#!lua name=genstream_v2
-- genstream's Redis functions, version 2. The library name and every function name
-- carry the version, so that replicas of two releases can run side by side during a
-- rolling deploy: a new release loads genstream_v3 next to this one.
--
-- Fields of the job hash these functions read and write (besides the metadata):
--   len, bytes        the log's length (the next seq) and total frame bytes
--   ended, status     "1" and the final status once the terminal event is in
--   finishedAt        when the terminal event landed (ms since the epoch, the writer's
--                     clock); for operators and tests, nothing here reads it
--   reaper, reaperAt  who claimed the job's end (its owner about to save its answer,
--                     or a reaper of an orphan), and when (ms, Redis clock). Only the
--                     claimant may append from then on. The name predates the owner's
--                     claim; it is kept so that genstream_v1 appends honour a claim.
--   abortRequested    "1" once any replica asked to abort; every append reports it

-- Now in ms on the Redis clock, so that claim ages never depend on replicas' clocks.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The SSE frame of an event: the same bytes as `Frame::encode` in the engine
-- (engine/src/event.rs), held byte-equal by `lua_frames_equal_frame_encode` in
-- genstream-redis's tests. BODY is serde_json's compact {"event":NAME,"data":{...}}.
local function frame_of(seq, name, body)
  return 'id: ' .. seq .. '\nevent: ' .. name .. '\ndata: {"seq":' .. seq .. ','
    .. string.sub(body, 2) .. '\n\n'
end

-- Appends one event to a job's log, atomically:
--   assign the next seq, check the caps, build the SSE frame, XADD it with stream id
--   0-(seq+1) and the writer's id, update the job hash, refresh TTLs, PUBLISH.
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
-- ARGV[11] expected seq, or "": the seq the writer believes comes next. If the log is
--          already past it and the entry there is this writer's with these very bytes,
--          an earlier try landed (its reply was lost): "dup", nothing appended. If the
--          entry is someone else's, the writer lost the job. A non-terminal event whose
--          expected seq is beyond the log means the store lost entries: "lost".
-- ARGV[12] the writer's id (a replica id); once the end is claimed (`reaper`), only
--          the claimant may append
-- Returns {"ok", seq, frame, abort} | {"dup", seq, abort} | {"ended"} | {"full"}
--       | {"missing"} | {"lost"} | {"conflict"}   (abort: 1 if abortRequested)
local function append(keys, args)
  local job, log = keys[1], keys[2]
  local h = redis.call('HMGET', job, 'len', 'ended', 'reaper', 'bytes', 'abortRequested')
  if not h[1] then return {'missing'} end
  local len = tonumber(h[1])
  local writer = args[12]
  local abort = 0
  if h[5] == '1' then abort = 1 end
  local expected = nil
  if args[11] ~= '' then expected = tonumber(args[11]) end
  if expected and len > expected then
    local id = '0-' .. (expected + 1)
    local e = redis.call('XRANGE', log, id, id)
    if e[1] then
      local f, w = nil, nil
      local fields = e[1][2]
      for i = 1, #fields, 2 do
        if fields[i] == 'f' then f = fields[i + 1] elseif fields[i] == 'w' then w = fields[i + 1] end
      end
      if w == writer and f == frame_of(expected, args[1], args[2]) then
        return {'dup', expected, abort}
      end
    end
    if h[2] == '1' or (h[3] and h[3] ~= writer) then return {'ended'} end
    return {'conflict'}
  end
  if h[2] == '1' then return {'ended'} end
  if h[3] and h[3] ~= writer then return {'ended'} end
  local terminal = args[3] == '1'
  -- A terminal event still lands (at the log's own head), so its readers see it end.
  if expected and expected > len and not terminal then return {'lost'} end
  local seq = len
  local frame = frame_of(seq, args[1], args[2])
  local bytes = tonumber(h[4] or '0')
  if not terminal and (seq + 1 > tonumber(args[4]) or bytes + #frame > tonumber(args[5])) then
    return {'full'}
  end
  redis.call('XADD', log, '0-' .. (seq + 1), 'f', frame, 'w', writer)
  redis.call('HSET', job, 'len', seq + 1, 'bytes', bytes + #frame)
  local ttl = args[6]
  if terminal then
    redis.call('HSET', job, 'ended', '1', 'status', args[9], 'finishedAt', args[10])
    ttl = args[7]
  end
  redis.call('PEXPIRE', job, ttl)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PUBLISH', args[8], frame)
  return {'ok', seq, frame, abort}
end

-- Makes KEYS[1] (a conversation's latest-job pointer) point to ARGV[1] if it still
-- points to ARGV[2] ("" = absent). Returns 1 on success, 0 if someone else won.
local function claim(keys, args)
  local cur = redis.call('GET', keys[1])
  if (cur or '') ~= args[2] then return 0 end
  redis.call('SET', keys[1], args[1], 'PX', args[3])
  return 1
end

-- Claims the end of job KEYS[1] for ARGV[1]: the one decision of who saves the
-- response message and appends the terminal event, taken by the owner before it saves
-- its answer and by a reaper before it saves a partial one. The claimant wins if
-- nobody holds the claim, if it holds it already (a retry), if the holder is ARGV[2]
-- (the caller saw that replica's lease lapse; "" = none), or if the holder is a reaper
-- (not the owner) whose claim is older than ARGV[3] ms (0 = never) — a reaper that is
-- alive but stopped trying. A won claim is stamped with the Redis clock.
-- Returns "ok" | "taken" | "ended" | "missing".
local function claim_end(keys, args)
  local h = redis.call('HMGET', keys[1], 'len', 'ended', 'reaper', 'reaperAt', 'owner')
  if not h[1] then return 'missing' end
  if h[2] == '1' then return 'ended' end
  local now = now_ms()
  local cur = h[3]
  if cur and cur ~= args[1] and cur ~= args[2] then
    local at = tonumber(h[4] or '0')
    local stale = tonumber(args[3])
    if cur == h[5] or stale <= 0 or at <= 0 or now - at <= stale then return 'taken' end
  end
  redis.call('HSET', keys[1], 'reaper', args[1], 'reaperAt', now)
  return 'ok'
end

-- Asks for job KEYS[1] to be aborted: sets abortRequested (which every later append
-- reports to its writer, so the owner learns it even if the publish is lost) and
-- publishes the stream id ARGV[2] on the control channel ARGV[1]. Returns 1, or 0 if
-- the job ended or is unknown (nothing to abort).
local function request_abort(keys, args)
  local h = redis.call('HMGET', keys[1], 'len', 'ended')
  if not h[1] or h[2] == '1' then return 0 end
  redis.call('HSET', keys[1], 'abortRequested', '1')
  redis.call('PUBLISH', args[1], args[2])
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

redis.register_function('genstream_acquire_slot_v2', acquire_slot)
redis.register_function('genstream_rate_window_v2', rate_window)
redis.register_function('genstream_append_v2', append)
redis.register_function('genstream_claim_end_v2', claim_end)
redis.register_function('genstream_request_abort_v2', request_abort)
redis.register_function('genstream_claim_v2', claim)
