"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, appended and flushed per record.

Invariants: every record has ``time_s`` (wall clock), ``elapsed_s`` (since the log was opened) and
``kind`` (``step``, ``generator``, ``reset``, ``event``...); values are plain JSON numbers or strings
(non-finite floats are written as strings so the file stays valid JSON). Appending never rewrites earlier
lines, so a crashed run keeps everything it logged and a resumed run continues the same file.

TensorBoard: when ``tensorboardX`` is installed (``pip install prorl-async[tensorboard]``), every numeric
value of ``step`` records also goes to event files in ``RUN_DIR/tensorboard/`` at ``global_step = version``
(nested maps such as ``reward_by_domain`` as ``reward_by_domain/<key>``), and ``generator`` records under
``<source>/<key>`` by their time. JSONL stays the source of truth; the event files are a view of it.

Usage::

    log = MetricsLog(run_dir)
    log.write("step", version=3, loss=0.12, reward_mean=0.4)
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


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``record`` (nested maps flattened with ``/``); bools and strings left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class MetricsLog:
    """Append-only JSONL metrics file; safe to reopen (resume appends). TensorBoard events when available."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._start = time.time()
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard") if tensorboard else None

    def write(self, kind: str, **values: Any) -> dict[str, Any]:
        now = time.time()
        record = {"kind": kind, "time_s": round(now, 3), "elapsed_s": round(now - self._start, 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        if self._tb is not None and kind in ("step", "generator", "validation"):
            self._to_tensorboard(kind, record)
        return record

    def _to_tensorboard(self, kind: str, record: dict[str, Any]) -> None:
        skip = {"time_s", "elapsed_s", "version"}
        if kind == "generator":
            prefix, step = f"{record.get('source', 'generator')}/", int(record["elapsed_s"])
        else:
            prefix, step = ("" if kind == "step" else f"{kind}/"), int(record.get("version", 0))
        for key, value in _scalars({k: v for k, v in record.items() if k not in skip}, prefix).items():
            self._tb.add_scalar(key, value, global_step=step, walltime=record["time_s"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(directory: Path) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir=str(directory), flush_secs=10)


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
