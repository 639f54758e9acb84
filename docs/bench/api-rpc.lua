-- wrk script: Bitcoin JSON-RPC getblockcount; HTTP Basic credentials (base64 of
-- key:secret) from $API_BASIC, never on the command line.
wrk.method = "POST"
wrk.body = '{"version":"1.1","method":"getblockcount","params":[],"id":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Basic " .. os.getenv("API_BASIC")
