"""docs/api.md stays true: its ```python blocks run, in order, in one namespace."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return [match.group(1) for match in PYTHON_BLOCK.finditer(text)]


def test_api_doc_has_examples_for_the_issue_api() -> None:
    text = API_DOC.read_text(encoding="utf-8")
    code = "\n".join(python_blocks(text))
    for name in ("Transaction.parse", ".serialize()", ".txid", "legacy_sighash(",
                 "verify_input(", "asset_id(", "parse_marker(", "color_outputs(",
                 "build_transfer(", "combine(", "apply_block(", "make_block("):
        assert name in code, f"docs/api.md has no example using {name}"


def test_api_doc_examples_run() -> None:
    namespace: dict[str, object] = {"__name__": "api_doc"}
    for number, block in enumerate(python_blocks(API_DOC.read_text(encoding="utf-8")), 1):
        filename = f"docs/api.md python block {number}"
        # registered so a failing example shows its own source line in the traceback
        linecache.cache[filename] = (len(block), None, block.splitlines(True), filename)
        try:
            exec(compile(block, filename, "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/api.md python block {number} failed: {error!r}") from error


def test_block_extraction_sees_every_block() -> None:
    sample = "text\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(sample) == ["x = 1\n", "y = 2\n"]
