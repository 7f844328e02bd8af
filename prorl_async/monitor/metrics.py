"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, appended and flushed per record.

Invariants: every record has ``time_s`` (wall clock), ``elapsed_s`` (since the log was opened) and
``kind`` (``step``, ``generator``, ``reset``, ``event``...); values are plain JSON numbers or strings
(non-finite floats are written as strings so the file stays valid JSON). Appending never rewrites earlier
lines, so a crashed run keeps everything it logged and a resumed run continues the same file.

TensorBoard: when ``tensorboardX`` is installed (``pip install prorl-async[tensorboard]``), every numeric
value of ``step`` records also goes to event files in ``RUN_DIR/tensorboard/`` at ``global_step = version``
(nested maps such as ``reward_by_domain`` as ``reward_by_domain/<key>``), and ``generator`` records under
``<source>/<key>`` by their time. JSONL stays the source of truth; the event files are a view of it.

Sinks (experiment trackers such as W&B, ``prorl_async.monitor.wandb_sink``) get every record after it is written,
and :func:`tracked_scalars` names their numbers as TensorBoard does. A tracker must never take the run down: a sink
that raises when it opens or writes is closed, logged once and dropped for the rest of the run, and an ``event``
record ``tracking_off`` says so.

Usage::

    log = MetricsLog(run_dir)
    log.write("step", version=3, loss=0.12, reward_mean=0.4)
    log.close()
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

TRACKED_KINDS = ("step", "validation", "generator")
_UNTRACKED = frozenset({"time_s", "elapsed_s", "version"})  # the axes, not series


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


def tracked_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``step``, ``validation`` or ``generator`` record as trackers name them (else nothing).

    Step records' keys as they are, validation records' under ``validation/``, a generator's under its source
    (``generator-0/tokens_per_s``); nested maps flattened with ``/`` (``buffer_counters/received``). ``time_s``,
    ``elapsed_s`` and ``version`` are the axes, not series.
    """
    kind = record.get("kind")
    if kind not in TRACKED_KINDS:
        return {}
    prefix = {"step": "", "validation": "validation/"}.get(kind, f"{record.get('source', 'generator')}/")
    return _scalars({k: v for k, v in record.items() if k not in _UNTRACKED and k != "kind"}, prefix)


class Sink(Protocol):
    """A tracker fed every record: opened once, then ``write(record)`` per record, ``close()`` at the end."""

    name: str

    def open(self) -> None: ...

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Append-only JSONL metrics file; safe to reopen (resume appends). TensorBoard events when available, and
    ``sinks`` (opened here) fed every record."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, sinks: Iterable[Sink] = ()) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._start = time.time()
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard") if tensorboard else None
        self._sinks: list[Sink] = []
        for sink in sinks:
            try:
                sink.open()
            except Exception as err:  # a tracker that cannot start (no network, no login) is left out
                self._drop(sink, "open", err)
            else:
                self._sinks.append(sink)

    def write(self, kind: str, **values: Any) -> dict[str, Any]:
        now = time.time()
        record = {"kind": kind, "time_s": round(now, 3), "elapsed_s": round(now - self._start, 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        if self._tb is not None and kind in TRACKED_KINDS:
            self._to_tensorboard(kind, record)
        for sink in list(self._sinks):
            try:
                sink.write(record)
            except Exception as err:  # never take the run down for a tracker
                self._sinks.remove(sink)
                self._drop(sink, "write", err)
        return record

    def _drop(self, sink: Sink, stage: str, err: Exception) -> None:
        """Close ``sink`` (quietly), log once, note it in the file; it gets no record from now on."""
        log.warning("%s failed to %s, off for the rest of the run: %s: %s", sink.name, stage, type(err).__name__, err,
                    exc_info=err)
        try:
            sink.close()
        except Exception:
            log.debug("closing %s after its failure failed too", sink.name, exc_info=True)
        detail = f"{type(err).__name__}: {err}"[:300]
        self.write("event", event="tracking_off", sink=sink.name, stage=stage, detail=detail)

    def _to_tensorboard(self, kind: str, record: dict[str, Any]) -> None:
        step = int(record["elapsed_s"]) if kind == "generator" else int(record.get("version", 0))
        for key, value in tracked_scalars(record).items():
            self._tb.add_scalar(key, value, global_step=step, walltime=record["time_s"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as err:  # the run's own files are closed already
                log.warning("%s failed to close: %s: %s", sink.name, type(err).__name__, err)
        self._sinks = []


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
