"""The intake benchmark runs the node's own intake functions and checks what it measures."""

from __future__ import annotations

import pytest

from streams.tools.bench_core import bench_intake

pytestmark = pytest.mark.unit


def test_intake_bench_pre_verifies_every_record() -> None:
    figures = bench_intake(200, lanes=20)
    assert figures["records"] == 200
    assert figures["cpu_us_per_tx"] > 0
