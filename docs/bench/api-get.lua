-- wrk script: GET with the bearer token from $API_TOKEN (never on the command line).
wrk.headers["Authorization"] = "Bearer " .. os.getenv("API_TOKEN")
