-- wrk script for `make bench`: optionally feeds one pre-signed BitTransfer per request, optionally paces
-- each connection (a fixed delay before each request: a rate-limited run), and prints one JSON line.
-- wrk -s bench/feed.lua -t N URL -- <transfers.tsv|-> <first line> <delay ms|0> <N> [wrap]
-- transfers.tsv: one "Bitcoin-Transfer<TAB>Authorization" per line; each line is sent once (thread i of n
-- sends lines first+i, first+i+n, ...). Past the end, requests go unpaid (402: counted as errors), or with
-- `wrap` start again from the first (for targets that keep no replay record: verify only).
local counter = 0

function setup(thread)
  thread:set("index", counter)
  counter = counter + 1
end

function init(args)
  local path, first = args[1], tonumber(args[2] or "1")
  local nthreads = tonumber(args[4] or "1")
  pause = tonumber(args[3] or "0")
  wrap = args[5] == "wrap"
  lines = {}
  if path and path ~= "-" then
    local n = 0
    for line in io.lines(path) do
      n = n + 1
      if n >= first and (n - first) % nthreads == index then table.insert(lines, line) end
    end
  end
  sent = 0
end

function delay()
  return pause
end

function request()
  if #lines == 0 then return wrk.request() end
  sent = sent + 1
  if wrap and sent > #lines then sent = 1 end
  local line = lines[sent]
  if line == nil then return wrk.request() end
  local tab = string.find(line, "\t", 1, true)
  local headers = {["Bitcoin-Transfer"] = string.sub(line, 1, tab - 1),
                   ["Authorization"] = string.sub(line, tab + 1)}
  return wrk.format("GET", nil, headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
