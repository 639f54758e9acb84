-- wrk script: user B posts buy orders of 1 unit at 1.00 KRW, each with its own
-- Idempotency-Key (thread id + counter), bearer token from $API_TOKEN.
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  thread_id = id
end

function request()
  counter = counter + 1
  local headers = {
    ["Authorization"] = "Bearer " .. os.getenv("API_TOKEN"),
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("wrk-%d-%09d-%d", thread_id, counter, os.time()),
  }
  local body = '{"security_code":"KR101502D327","side":"buy","price":"1.00","quantity":1}'
  return wrk.format("POST", "/api/market/orders", headers, body)
end

function response(status, headers, body)
  if status ~= 200 then
    print("status " .. status .. ": " .. body)
  end
end
