-- wrk's request generator for scripts/serve_wrk.py: POST /v1/embeddings with 1 to 3 texts of 3 to 60
-- words (seeded, 500 distinct bodies), and a count of the answers by status, printed when wrk ends.
local words = {"token", "merging", "keeps", "the", "transformer", "accurate", "while", "it", "drops", "redundant",
  "tokens", "from", "every", "layer", "of", "encoder", "so", "that", "batches", "sentences", "run", "faster", "on",
  "small", "machines", "and", "embeddings", "stay", "close", "to", "original", "model"}
local model = os.getenv("TOKENFUSE_MODEL") or "model"
math.randomseed(7)
local bodies = {}
for i = 1, 500 do
  local texts = {}
  for t = 1, math.random(1, 3) do
    local picked = {}
    for k = 1, math.random(3, 60) do picked[k] = words[math.random(#words)] end
    texts[t] = '"' .. table.concat(picked, " ") .. '"'
  end
  bodies[i] = '{"model": "' .. model .. '", "input": [' .. table.concat(texts, ", ") .. ']}'
end
local next_body = 0
request = function()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"}, bodies[next_body])
end
statuses = {}  -- a global of each thread's own Lua state, read back in done()
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
done = function(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do total[status] = (total[status] or 0) + count end
  end
  local parts = {}
  for status, count in pairs(total) do parts[#parts + 1] = string.format('"%d": %d', status, count) end
  io.write(string.format('WRK_RESULT {"requests": %d, "statuses": {%s}, "errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}}\n',
    summary.requests, table.concat(parts, ", "), summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
