"""The ``capledger`` console script of pyproject.toml resolves to the click group, and
every module of COMMAND_MODULES registers a working command (none replaced by the
"unavailable" stand-in that a module failing to import gets)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import click
import pytest

from streams.cli.main import COMMAND_MODULES, main

pytestmark = pytest.mark.unit

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_console_script_is_the_click_group() -> None:
    target = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"][
        "capledger"]
    module_path, _, attribute = target.partition(":")
    assert getattr(importlib.import_module(module_path), attribute) is main


def test_every_command_module_registers() -> None:
    for module_path in COMMAND_MODULES:
        command = importlib.import_module(module_path).cli
        assert isinstance(command, click.Command), module_path
        registered = main.commands.get(command.name or "")
        assert registered is command, f"{module_path} did not register as {command.name!r}"
