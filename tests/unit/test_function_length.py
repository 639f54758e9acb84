"""No function in ``ledger/`` or ``streams/`` is longer than FUNCTION_LINES_MAX lines,
unless ALLOWED names it with a one-line reason.

A long function is split so that a parent decides and small, mostly pure helpers
compute (STYLE.md, issue 7). The length is counted from the ``def`` line to the last
line of the body (decorators not counted), nested functions inside their parent.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHECKED_DIRS = ("ledger", "streams")
FUNCTION_LINES_MAX = 70

# "path:qualified name" -> why it may stay longer for now (one line).
ALLOWED: dict[str, str] = {}


def long_functions(source: str, path: str, lines_max: int) -> dict[str, int]:
    """``path:Class.function`` -> length in lines, for every function over ``lines_max``."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                assert child.end_lineno is not None
                length = child.end_lineno - child.lineno + 1
                if length > lines_max:
                    found[f"{path}:{prefix}{child.name}"] = length
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source, filename=path), "")
    return found


def tree_long_functions() -> dict[str, int]:
    found: dict[str, int] = {}
    for directory in CHECKED_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            found.update(long_functions(path.read_text(encoding="utf-8"), relative,
                                        FUNCTION_LINES_MAX))
    return found


def test_detector_counts_methods_and_nested_functions() -> None:
    def body(indent: int) -> str:
        return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(4))

    source = (
        f"def short():\n{body(4)}"  # 5 lines: not over 5
        f"class C:\n    async def long(self):\n{body(8)}{body(8)}"
        f"        def inner():\n{body(12)}{body(12)}"
    )
    assert long_functions(source, "m.py", 5) == {"m.py:C.long": 18, "m.py:C.long.inner": 9}


def test_no_function_over_the_limit_unless_allowed() -> None:
    found = tree_long_functions()
    unexplained = {name: length for name, length in found.items() if name not in ALLOWED}
    assert not unexplained, (
        f"functions over {FUNCTION_LINES_MAX} lines (split them, or add them to ALLOWED "
        "with a reason): " + ", ".join(f"{n} ({length})" for n, length in unexplained.items()))


def test_allowed_entries_are_still_needed_and_explained() -> None:
    found = tree_long_functions()
    stale = sorted(name for name in ALLOWED if name not in found)
    assert not stale, f"no longer over {FUNCTION_LINES_MAX} lines, remove from ALLOWED: {stale}"
    assert all(reason.strip() and "\n" not in reason for reason in ALLOWED.values())
