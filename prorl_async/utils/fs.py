"""Files other processes read while they are written: one way to write them, atomically."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a torn one (a temporary
    file beside it, then a rename, which is atomic within one filesystem)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of the text file at ``path`` (a process's log), or ``(no log)``."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
