"""One table of exit codes: the README's "Exit codes" section, the table in the
docstring of ``streams/cli/exit_codes.py`` and its constants say the same thing, and
no command of ``streams/cli`` or ``streams/tools`` exits with a bare number."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from streams.cli import exit_codes
from streams.node import app

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXIT_CHECKED_DIRS = (ROOT / "streams" / "cli", ROOT / "streams" / "tools")
# Calls that end the process with their first argument as the exit code.
EXIT_CALLS = frozenset({"sys.exit", "exit", "SystemExit", "os._exit", "ctx.exit"})

Row = tuple[int, str, str]


def table_rows(text: str) -> list[Row]:
    """The (code, name, meaning) rows of the first markdown table in ``text``."""
    rows: list[Row] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        if cells[0] == "code" or set(cells[0]) <= {"-"}:
            continue
        assert len(cells) == 3, f"expected | code | name | meaning |, got {line!r}"
        rows.append((int(cells[0]), cells[1], cells[2]))
    return rows


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def module_constants() -> dict[str, int]:
    return {name: value for name, value in vars(exit_codes).items()
            if name.isupper() and isinstance(value, int)}


def test_readme_table_is_the_module_table() -> None:
    readme = table_rows(readme_section("Exit codes"))
    docstring = table_rows(exit_codes.__doc__ or "")
    assert readme, "README has no exit-code table"
    assert readme == docstring


def test_every_constant_is_in_the_table_and_nothing_else() -> None:
    docstring = table_rows(exit_codes.__doc__ or "")
    assert {name: code for code, name, _ in docstring} == module_constants()
    assert len({code for code, _, _ in docstring}) == len(docstring), "a code used twice"


def test_node_halt_code_is_the_table_code() -> None:
    # streams/node may not import the CLI, so it keeps its own constant.
    assert app.EXIT_HALTED == exit_codes.HALTED


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_call_name(func.value)}.{func.attr}"
    return ""


def _is_number(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return (isinstance(node, ast.Constant) and isinstance(node.value, int)
            and not isinstance(node.value, bool))


def bare_exits(source: str, filename: str) -> list[str]:
    """``file:line call(N)`` for every process exit with a literal integer."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Call) or _call_name(node.func) not in EXIT_CALLS:
            continue
        argument = node.args[0] if node.args else None
        if argument is not None and _is_number(argument):
            found.append(f"{filename}:{node.lineno} {ast.unparse(node)}")
    return found


def test_bare_exit_detector_catches_literals_and_passes_names() -> None:
    source = (
        "import sys\n"
        "sys.exit(3)\n"
        "raise SystemExit(-1)\n"
        "sys.exit(exit_codes.USAGE)\n"
        "raise SystemExit(code)\n"
        "sys.exit()\n"
    )
    assert bare_exits(source, "fixture.py") == [
        "fixture.py:2 sys.exit(3)", "fixture.py:3 SystemExit(-1)"]


def test_no_cli_or_tool_exits_with_a_bare_number() -> None:
    found = []
    for directory in EXIT_CHECKED_DIRS:
        for path in sorted(directory.rglob("*.py")):
            found += bare_exits(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "exit through streams/cli/exit_codes.py:\n" + "\n".join(found)
