"""The platform's HTTP API server and web UI, run by ``koscom`` (decision 0080)."""
