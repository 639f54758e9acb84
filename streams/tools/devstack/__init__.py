"""The local development stack: a real Kafka broker and the system PostgreSQL.

Owns: fetching, starting, stopping and reporting the services that
``capledger dev up|down|status``, ``make test`` and the test fixtures need.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


class DevStackError(RuntimeError):
    """The stack cannot be brought up; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    running: bool
    address: str
    pid: int | None
    version: str
    detail: str = ""


APT_TIMEOUT_S = 900
_apt_updated = False


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apt_install(*packages: str) -> None:
    """Install Debian packages when we are root and apt-get exists; else explain."""
    global _apt_updated
    if not (is_root() and shutil.which("apt-get")):
        raise DevStackError(f"missing {', '.join(packages)}: install it with your package "
                            f"manager (e.g. sudo apt-get install {' '.join(packages)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=APT_TIMEOUT_S,
                       stdout=subprocess.DEVNULL)
        _apt_updated = True
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
                   check=True, env=env, timeout=APT_TIMEOUT_S, stdout=subprocess.DEVNULL)


def require_tool(executable: str, *apt_packages: str) -> str:
    """Path of ``executable``, installing its Debian package when root and missing."""
    found = shutil.which(executable)
    if found is None:
        apt_install(*(apt_packages or (executable,)))
        found = shutil.which(executable)
    if found is None:
        raise DevStackError(f"{executable} not found on PATH after installing {apt_packages}")
    return found
