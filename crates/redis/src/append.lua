#!lua name=genstream_v6
-- genstream's Redis functions, version 6. The library name and every function name
-- carry the version, so that replicas of two releases can load their own next to each
-- other: a new release loads genstream_v7 next to this one. Version 6 writes each
-- appended batch as one stream entry (its frames concatenated, the entry id that of
-- its last seq) where version 5 wrote one entry per event: one XADD per call instead
-- of one per event, a quarter fewer bytes per event. It takes each event as the SSE
-- frame its writer built (as version 5) and publishes as versions 4 and 5 (one message
-- per batch, the frames concatenated), so the channel name keeps version 4's kind
-- (`ch4`).
--
-- The log stream: one entry per landed batch, id 0-(last seq + 1), field f = the
-- batch's SSE frames concatenated in seq order, field w = the writer's id. Entries are
-- contiguous, so the entries from id 0-(s+1) on hold seq s (in the first of them) and
-- everything after it; an entry of one event is exactly version 5's entry, so readers
-- of version 6 read logs version 5 wrote. Each frame ends with a blank line and holds
-- none before it (compact JSON), so an entry splits after each "\n\n".
--
-- Fields of the job hash these functions read and write (besides the metadata):
--   len, bytes        the log's length (the next seq) and total frame bytes
--   ended, status     "1" and the final status once the terminal event is in
--   finishedAt        when the terminal event landed (ms since the epoch, the writer's
--                     clock); for operators and tests, nothing here reads it
--   reaper, reaperAt  who claimed the job's end (its owner about to save its answer,
--                     or a reaper of an orphan), and when (ms, Redis clock). Only the
--                     claimant may append from then on. The name predates the owner's
--                     claim; it is kept so that appends of earlier versions honour a claim.
--   abortRequested    "1" once any replica asked to abort; every append reports it
--   ttlAt             when an append last refreshed the job's TTLs (ms, the writer's
--                     clock): a running job's are refreshed once an eighth of the running
--                     TTL has passed (or the clocks disagree by that much), not on every
--                     call, so a key never has less than 7/8 of it left

-- Now in ms on the Redis clock, so that claim ages never depend on replicas' clocks.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The frame `frame` (built by the writer for some seq) rebuilt for `seq`: only its two
-- seq numbers change. The writer builds each frame with `Frame::encode` for the seq it
-- expects (engine/src/event.rs); this runs only where the event lands elsewhere (no
-- expected seq, or a terminal event landing at the log's own head). The bytes equal
-- `Frame::encode` at `seq`, held so by `lua_frames_equal_frame_encode` in
-- genstream-redis's tests. Nil if `frame` is not an SSE frame of ours.
local function reseq(frame, seq)
  local name, rest = string.match(frame, '^id: %d+\nevent: ([^\n]*)\ndata: {"seq":%d+,(.*)$')
  if not name then return nil end
  return 'id: ' .. seq .. '\nevent: ' .. name .. '\ndata: {"seq":' .. seq .. ',' .. rest
end

-- Whether the log holds seqs `from`..`last` (a range it has) as this writer's entries
-- with exactly the frames args[11 + (seq - from)]: the check that an earlier try of a
-- batch landed, whole or in part. The first entry may begin before `from` (a retry
-- may overlap what an earlier batch landed); those frames are not compared.
local function landed_by(log, from, last, writer, args)
  -- Each entry holds at least one seq, so this many entries cover the range.
  local entries = redis.call('XRANGE', log, '0-' .. (from + 1), '+', 'COUNT', last - from + 1)
  local want = from
  for i = 1, #entries do
    if want > last then break end
    local f, w = nil, nil
    local fields = entries[i][2]
    for j = 1, #fields, 2 do
      if fields[j] == 'f' then f = fields[j + 1] elseif fields[j] == 'w' then w = fields[j + 1] end
    end
    if w ~= writer or not f then return false end
    local pos = 1
    while pos <= #f and want <= last do
      local e = string.find(f, '\n\n', pos, true)
      if not e then return false end
      local frame = string.sub(f, pos, e + 1)
      local id = tonumber(string.match(frame, '^id: (%d+)\n'))
      if not id then return false end
      if id >= from then
        if id ~= want or frame ~= args[11 + want - from] then return false end
        want = want + 1
      end
      pos = e + 2
    end
  end
  return want == last + 1
end

-- Appends a batch of events to a job's log, atomically:
--   assign each the next seq and check the caps, then XADD the frames that land as one
--   entry (id 0-(last seq + 1), the frames concatenated, the writer's id), update the
--   job hash, refresh TTLs, PUBLISH the same bytes (one message). There is never a
--   seq without a log entry, nor an entry without a publish. A batch is the same as
--   its events appended one by one: the events before one that cannot land (the log
--   is full or ended) stay appended.
--
-- KEYS[1] job hash   KEYS[2] log stream   (both with the {streamId} hash tag)
-- ARGV[1] max events   ARGV[2] max bytes (terminal events are exempt)
-- ARGV[3] TTL ms while running   ARGV[4] TTL ms once finished
-- ARGV[5] pub/sub channel   ARGV[6] now (ms since epoch)
-- ARGV[7] expected first seq, or "": the seq the writer believes the batch's first
--         event gets. Where the log is already past it, an earlier try of this batch
--         landed, whole or in part (its reply was lost): what the log holds from there
--         must be this writer's, frame for frame these very bytes, and is not
--         appended again (`landed_by`); else the writer
--         lost the job. A batch whose first event is not terminal and whose expected
--         seq is beyond the log means the store lost entries: "lost".
-- ARGV[8] the writer's id (a replica id); once the end is claimed (`reaper`), only
--         the claimant may append
-- ARGV[9] the position (1-based) in the batch of its first terminal event, 0 if none
-- ARGV[10] the job status that terminal event sets ("" if none)
-- ARGV[11 + i] for event i = 0, 1, ...: its SSE frame as the writer built it for seq
--         (expected first seq + i), or for seq i when ARGV[7] is ""; an event landing
--         at another seq gets its frame rebuilt for that seq (`reseq`)
-- Returns {"ok", first seq, count, abort} (count events landed from the first seq on;
--         abort: 1 if abortRequested; the writer has the frames, so the reply carries
--         none) | {"ended"} | {"full"} | {"missing"} | {"lost"} | {"conflict"}
--         | {"bad frame"} (an error only when not even the first event could land)
local function append_batch(keys, args)
  local job, log = keys[1], keys[2]
  local h = redis.call('HMGET', job, 'len', 'ended', 'reaper', 'bytes', 'abortRequested',
    'ttlAt')
  if not h[1] then return {'missing'} end
  local len = tonumber(h[1])
  local writer = args[8]
  local abort = 0
  if h[5] == '1' then abort = 1 end
  local n = #args - 10
  local terminal_at = tonumber(args[9])
  local lost_claim = h[2] == '1' or (h[3] and h[3] ~= writer)
  local first = len
  local from = 1
  -- The seq the writer built the batch's first frame for.
  local built = 0
  if args[7] ~= '' then
    local expected = tonumber(args[7])
    built = expected
    if len > expected then
      local last = math.min(len - 1, expected + n - 1)
      if not landed_by(log, expected, last, writer, args) then
        if lost_claim then return {'ended'} end
        return {'conflict'}
      end
      first = expected
      from = last - expected + 2
      if from > n then return {'ok', first, n, abort} end
    elseif expected > len and terminal_at ~= 1 then
      -- A terminal event still lands (at the log's own head), so its readers see it end.
      return {'lost'}
    end
  end
  if lost_claim then
    if from == 1 then return {'ended'} end
    return {'ok', first, from - 1, abort}
  end
  local max_events, max_bytes = tonumber(args[1]), tonumber(args[2])
  local bytes = tonumber(h[4] or '0')
  local seq = len
  local frames = {}
  local ttl = args[3]
  local status = nil
  for i = from, n do
    local terminal = i == terminal_at
    local frame = args[10 + i]
    if seq ~= built + i - 1 then
      frame = reseq(frame, seq)
      if not frame then
        if #frames == 0 and from == 1 then return {'bad frame'} end
        break
      end
    end
    if not terminal and (seq + 1 > max_events or bytes + #frame > max_bytes) then break end
    frames[#frames + 1] = frame
    bytes = bytes + #frame
    seq = seq + 1
    if terminal then
      status = args[10]
      break
    end
  end
  if #frames == 0 then
    if from == 1 then return {'full'} end
    return {'ok', first, from - 1, abort}
  end
  local all = table.concat(frames)
  redis.call('XADD', log, '0-' .. seq, 'f', all, 'w', writer)
  -- The TTLs: the retention once the terminal event is in; while running, refreshed
  -- only when an eighth of the running TTL has passed since the last refresh (two
  -- commands fewer on nearly every call).
  local refresh = true
  if status then
    redis.call('HSET', job, 'len', seq, 'bytes', bytes, 'ended', '1', 'status', status,
      'finishedAt', args[6])
    ttl = args[4]
  else
    local now = tonumber(args[6])
    refresh = not h[6] or math.abs(now - tonumber(h[6])) * 8 >= tonumber(ttl)
    if refresh then
      redis.call('HSET', job, 'len', seq, 'bytes', bytes, 'ttlAt', args[6])
    else
      redis.call('HSET', job, 'len', seq, 'bytes', bytes)
    end
  end
  if refresh then
    redis.call('PEXPIRE', job, ttl)
    redis.call('PEXPIRE', log, ttl)
  end
  -- One message per batch, the entry's bytes: readers split it as they split entries.
  redis.call('PUBLISH', args[5], all)
  return {'ok', first, from - 1 + #frames, abort}
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

redis.register_function('genstream_acquire_slot_v6', acquire_slot)
redis.register_function('genstream_rate_window_v6', rate_window)
redis.register_function('genstream_append_batch_v6', append_batch)
redis.register_function('genstream_claim_end_v6', claim_end)
redis.register_function('genstream_request_abort_v6', request_abort)
redis.register_function('genstream_claim_v6', claim)
