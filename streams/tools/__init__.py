"""Operator tools: the demo, the local cluster, load generation, benchmarks, devstack."""
