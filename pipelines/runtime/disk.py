"""Free space on disk, asked before a run writes a large cache."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["free_disk"]


def free_disk(folder: Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free
