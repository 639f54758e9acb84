"""Test modules have unique basenames: pytest imports ``tests/unit`` and
``tests/integration`` modules by basename, so a clash fails the whole run at collection
(as ``make test`` found once; ``make unit`` alone cannot see it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS_DIR = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    names = Counter(path.name for path in TESTS_DIR.rglob("test_*.py"))
    assert sorted(name for name, count in names.items() if count > 1) == []
