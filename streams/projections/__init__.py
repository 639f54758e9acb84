"""Projections of the logs into PostgreSQL: row builders, the follower and writer, the runner."""
