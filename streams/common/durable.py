"""Durable file replacement: the one helper the node's files share.

Owns: ``fsync_directory`` — after a file is renamed into place, the directory's entry
reaches the disk only when the directory itself is synced (a power loss may otherwise
bring back the old name). Used by the snapshots, the signing guard and the pending
rejections file.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Sync ``directory``'s entries to the disk (raises ``OSError`` as ``os.fsync``)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
