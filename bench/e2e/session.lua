-- wrk script of bench/e2e.sh: clients with sessions.
--
--   wrk -t T -c C -d D -s session.lua URL -- SLOTS MAX_REQUESTS T
--
-- Each wrk thread drives SLOTS sessions (browsers), each with its own
-- cookie jar and its own client address (X-Forwarded-For, from the
-- RFC 2544 benchmarking range 198.18.0.0/15; a header value only, no
-- traffic goes there). wrk's Lua API does not say which connection a
-- response came on, so the script tags each request with its slot
-- (X-Bench-Slot) and the upstream echoes it back; a slot has at most one
-- request in flight, like a browser tab that waits for its page.
--
-- The jar: every Set-Cookie seen is kept (name=value) and sent back in
-- Cookie, so `cookie` and `affinity` see their own cookie on every
-- request after the first and take their pinned paths. The upstream's
-- session id comes in X-Bench-Sid (see bench/e2e/main.go for why it is
-- not a second Set-Cookie) and is sent back as cookie "sid".
--
-- A session is kept when the upstream's visit counter (X-Bench-Visits)
-- is one more than the last it reported for that slot; otherwise the
-- request reached an upstream that did not hold the session.
--
-- Each thread stops after MAX_REQUESTS/T responses (0: no bound
-- other than wrk's -d).

local threads = {}
local thread_count = 0

function setup(thread)
  thread:set("id", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

function init(args)
  slots = tonumber(args[1]) or 256
  local max_total = tonumber(args[2]) or 0
  max_requests = 0
  if max_total > 0 then
    -- A thread's state does not see the thread count: it is the
    -- third argument.
    max_requests = math.ceil(max_total / (tonumber(args[3]) or 1))
  end
  jar, cookie, visits, busy, xff = {}, {}, {}, {}, {}
  for s = 0, slots - 1 do
    jar[s] = {}
    cookie[s] = nil
    visits[s] = 0
    busy[s] = false
    local a = id * slots + s -- 0 .. 131071 within 198.18.0.0/15
    xff[s] = string.format("198.%d.%d.%d", 18 + math.floor(a / 65536) % 2, math.floor(a / 256) % 256, a % 256)
  end
  cursor = 0
  responses, kept, broken, fresh, pins = 0, 0, 0, 0, 0
end

function request()
  if not verified then
    -- wrk calls request() once in the first thread's state before the
    -- run, to check the script (that request is never sent): leave the
    -- slot free.
    verified = true
    if id == 0 then
      return wrk.format("GET", "/", { ["X-Bench-Slot"] = "0", ["X-Forwarded-For"] = xff[0] })
    end
  end
  -- The next slot without a request in flight.
  local s = cursor
  for _ = 1, slots do
    if not busy[s] then break end
    s = (s + 1) % slots
  end
  cursor = (s + 1) % slots
  busy[s] = true
  local h = { ["X-Bench-Slot"] = tostring(s), ["X-Forwarded-For"] = xff[s] }
  if cookie[s] then h["Cookie"] = cookie[s] end
  return wrk.format("GET", "/", h)
end

local function rebuild(s)
  local names = {}
  for name in pairs(jar[s]) do table.insert(names, name) end
  table.sort(names)
  local parts = {}
  for _, name in ipairs(names) do table.insert(parts, name .. "=" .. jar[s][name]) end
  cookie[s] = table.concat(parts, "; ")
end

function response(status, headers, body)
  responses = responses + 1
  local s = tonumber(headers["X-Bench-Slot"])
  if s ~= nil and jar[s] ~= nil then
    busy[s] = false
    local changed = false
    local sc = headers["Set-Cookie"]
    if sc then
      local name, value = string.match(sc, "^%s*([^=;%s]+)=([^;]*)")
      if name and jar[s][name] ~= value then
        jar[s][name] = value
        changed = true
        pins = pins + 1
      end
    end
    local sid = headers["X-Bench-Sid"]
    local v = tonumber(headers["X-Bench-Visits"]) or 0
    if sid then
      jar[s]["sid"] = sid
      changed = true
      fresh = fresh + 1
    elseif v == visits[s] + 1 then
      kept = kept + 1
    else
      broken = broken + 1
    end
    visits[s] = v
    if changed then rebuild(s) end
  end
  if max_requests > 0 and responses >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local k, b, f, p = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    k = k + t:get("kept")
    b = b + t:get("broken")
    f = f + t:get("fresh")
    p = p + t:get("pins")
  end
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    "E2E requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d errors=%d kept=%d broken=%d new=%d cookies_set=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), errors, k, b, f, p))
end
