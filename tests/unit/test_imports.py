"""The pure core stays pure: ``ledger/`` imports no I/O library and nothing from ``streams/``.

Two checks: a static one over every module's syntax tree (every ``import`` anywhere,
including inside functions, plus calls to I/O builtins and ``sys`` I/O attributes),
and a dynamic one that imports every ``ledger`` module in a fresh interpreter and
looks at what got loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LEDGER_DIR = Path(__file__).resolve().parents[2] / "ledger"

# Top-level modules the core must never import: I/O, network, processes, clocks,
# randomness, environment, the shell's libraries, and dynamic import machinery.
FORBIDDEN_MODULES = frozenset(
    {
        # the shell and its libraries
        "streams", "faust", "aiokafka", "kafka", "psycopg", "psycopg2", "sqlalchemy",
        "alembic", "fastavro", "click", "rich", "psutil", "mode",
        # concurrency and networking
        "asyncio", "socket", "ssl", "select", "selectors", "http", "urllib", "requests",
        "httpx", "threading", "multiprocessing", "concurrent", "subprocess", "signal",
        # files and the environment
        "os", "pathlib", "io", "shutil", "tempfile", "glob", "fnmatch", "sqlite3", "dbm",
        "shelve", "pickle", "mmap", "fileinput", "logging", "warnings",
        # clocks and randomness
        "time", "datetime", "calendar", "zoneinfo", "random", "secrets", "uuid",
        # dynamic imports would defeat this check
        "importlib", "imp", "runpy", "ctypes",
    }
)
FORBIDDEN_BUILTINS = frozenset(
    {"open", "print", "input", "__import__", "exec", "eval", "breakpoint"}
)
FORBIDDEN_SYS_ATTRIBUTES = frozenset({"stdin", "stdout", "stderr", "exit", "argv", "path"})
# Third-party libraries the core may use, and the one module allowed to use each.
ALLOWED_THIRD_PARTY = {"coincurve": {"keys.py"}}
STDLIB = sys.stdlib_module_names


def ledger_modules() -> list[Path]:
    paths = sorted(LEDGER_DIR.rglob("*.py"))
    assert paths, f"no modules found under {LEDGER_DIR}"
    return paths


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: stays inside the ledger package
                names.append((node.lineno, "ledger." + (node.module or "")))
            else:
                assert node.module is not None
                names.append((node.lineno, node.module))
    return names


def violations(path: Path, root: Path = LEDGER_DIR.parent) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    found: list[str] = []
    where = path.relative_to(root)
    for lineno, name in imported_names(tree):
        top = name.split(".")[0]
        if top in FORBIDDEN_MODULES:
            found.append(f"{where}:{lineno}: imports {name}")
        elif top in ("__future__", "ledger") or top in STDLIB:
            continue
        elif path.name not in ALLOWED_THIRD_PARTY.get(top, set()):
            found.append(f"{where}:{lineno}: imports third-party {name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_BUILTINS
        ):
            found.append(f"{where}:{node.lineno}: calls {node.func.id}()")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
            and node.attr in FORBIDDEN_SYS_ATTRIBUTES
        ):
            found.append(f"{where}:{node.lineno}: uses sys.{node.attr}")
    return found


@pytest.mark.parametrize("path", ledger_modules(), ids=lambda p: p.name)
def test_ledger_module_is_pure(path: Path) -> None:
    assert violations(path) == []


def test_checker_catches_violations(tmp_path: Path) -> None:
    # The check must be able to fail: feed it a module that breaks every rule.
    source = (
        "import os\nfrom streams import cli\nimport aiokafka.producer\nimport numpy\n"
        "def f():\n    import time\n    open('x')\n    import sys\n    sys.stdout.write('')\n"
        "from . import tx\n"
    )
    probe = tmp_path / "ledger" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(source)
    joined = "\n".join(violations(probe, tmp_path))
    for expected in ("imports os", "imports streams", "imports aiokafka.producer",
                     "third-party numpy", "imports time", "calls open()", "uses sys.stdout"):
        assert expected in joined
    assert "ledger.tx" not in joined


def test_importing_ledger_loads_no_io_library() -> None:
    # A fresh interpreter: import every ledger module, then list what got loaded.
    script = (
        "import importlib, pkgutil, sys, ledger\n"
        "for m in pkgutil.walk_packages(ledger.__path__, 'ledger.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=LEDGER_DIR.parent,
        check=True,
    )
    loaded = {name.split(".")[0] for name in result.stdout.split()}
    heavy = {"streams", "faust", "aiokafka", "psycopg", "sqlalchemy", "alembic", "fastavro",
             "asyncio", "socket", "ssl", "subprocess", "click", "rich"}
    assert loaded & heavy == set()


# ---------------------------------------------------------------------------------
# The shell's layering, declared once (decision 0040). A group may import itself and
# the groups listed for it; ``ledger`` and third-party libraries are open to all.
# Read it top-down: cli -> tools/api -> market/legacy -> node/client/projections -> kafka
# -> common -> ledger. Nothing outside ``cli`` (and the ``streams`` entry points)
# imports a CLI module.

STREAMS_DIR = LEDGER_DIR.parent / "streams"
LAYERS: dict[str, frozenset[str]] = {
    "cli": frozenset({"tools", "api", "market", "legacy", "node", "client", "projections",
                      "kafka", "common"}),
    "tools": frozenset({"api", "market", "legacy", "node", "client", "projections", "kafka",
                        "common"}),
    "legacy": frozenset({"client", "projections", "kafka", "common"}),
    "api": frozenset({"market", "client", "projections", "kafka", "common"}),
    "market": frozenset({"client", "kafka", "common"}),
    "node": frozenset({"kafka", "common"}),
    "client": frozenset({"kafka", "common"}),
    "projections": frozenset({"client", "kafka", "common"}),
    "kafka": frozenset({"common"}),
    "common": frozenset(),
}
ENTRY_POINTS = frozenset({"__init__.py", "__main__.py"})  # the only modules at streams/ root


def streams_group(path: Path, root: Path) -> str | None:
    """The role folder a module of ``streams`` sits in (None for the root's entry points)."""
    parts = path.relative_to(root / "streams").parts
    return parts[0] if len(parts) > 1 else None


def layering_violations(path: Path, root: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    group = streams_group(path, root)
    allowed = LAYERS.get(group, frozenset()) | {group} if group else frozenset(LAYERS)
    where = path.relative_to(root)
    found = []
    for lineno, name in imported_names(tree):
        parts = name.split(".")
        if parts[0] != "streams":
            continue
        if len(parts) < 2:
            found.append(f"{where}:{lineno}: imports the bare streams package; name a module")
            continue
        target = parts[1]
        if target not in LAYERS:
            found.append(f"{where}:{lineno}: imports {name}, outside every role folder")
        elif target not in allowed:
            found.append(f"{where}:{lineno}: {group or 'streams'} may not import {name} "
                         f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
    return found


def streams_modules(root: Path = LEDGER_DIR.parent) -> list[Path]:
    paths = sorted((root / "streams").rglob("*.py"))
    assert paths, "no modules found under streams/"
    return paths


@pytest.mark.parametrize("path", streams_modules(),
                         ids=lambda p: str(p.relative_to(STREAMS_DIR)))
def test_streams_module_respects_layers(path: Path) -> None:
    assert layering_violations(path, LEDGER_DIR.parent) == []


def test_streams_root_holds_only_entry_points() -> None:
    root_modules = {p.name for p in STREAMS_DIR.glob("*.py")}
    assert root_modules <= ENTRY_POINTS, root_modules - ENTRY_POINTS
    folders = {p.name for p in STREAMS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(LAYERS), folders - set(LAYERS)


def test_layering_checker_catches_wrong_imports(tmp_path: Path) -> None:
    # The check must be able to fail: a node module importing a CLI module and a tool,
    # a kafka module importing the client, and an import of a module at no role.
    (tmp_path / "streams" / "node").mkdir(parents=True)
    (tmp_path / "streams" / "kafka").mkdir()
    node = tmp_path / "streams" / "node" / "probe.py"
    node.write_text("from streams.kafka import codec\nfrom streams.cli.genesis import x\n"
                    "def f():\n    import streams.tools.demo\n")
    kafka = tmp_path / "streams" / "kafka" / "probe.py"
    kafka.write_text("from streams.client.status import StatusWatcher\nimport streams.loose\n")
    node_found = layering_violations(node, tmp_path)
    assert node_found == [
        "streams/node/probe.py:2: node may not import streams.cli.genesis "
        "(allowed: common, kafka, node)",
        "streams/node/probe.py:4: node may not import streams.tools.demo "
        "(allowed: common, kafka, node)",
    ]
    kafka_found = "\n".join(layering_violations(kafka, tmp_path))
    assert "kafka/probe.py:1: kafka may not import streams.client.status" in kafka_found
    assert "kafka/probe.py:2: imports streams.loose, outside every role folder" in kafka_found
