"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, appended and flushed per record.

Invariants: every record has ``time_s`` (wall clock), ``elapsed_s`` (since the log was opened) and
``kind`` (``step``, ``generator``, ``reset``, ``event``...); values are plain JSON numbers or strings
(non-finite floats are written as strings so the file stays valid JSON). Appending never rewrites earlier
lines, so a crashed run keeps everything it logged and a resumed run continues the same file.

Usage::

    log = MetricsLog(run_dir)
    log.write("step", step=3, loss=0.12, reward_mean=0.4)
    log.close()
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return _plain(value.item())
    return str(value)


class MetricsLog:
    """Append-only JSONL metrics file; safe to reopen (resume appends)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._start = time.time()

    def write(self, kind: str, **values: Any) -> dict[str, Any]:
        now = time.time()
        record = {"kind": kind, "time_s": round(now, 3), "elapsed_s": round(now - self._start, 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        return record

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of ``path`` (optionally of one kind), skipping a torn last line of a crashed run."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
