"""Weights & Biases as a view of ``metrics.jsonl`` (``[tracking] wandb = true``), fed by the learner's metrics log.

Invariants:
- One process logs: the learner, which owns ``RUN_DIR/metrics.jsonl`` (the generators' figures reach it as
  ``generator`` records). Its :class:`~prorl_async.monitor.metrics.MetricsLog` hands every record to this sink and
  drops the sink, once and for good, when it raises: W&B never takes the trainer down.
- The resolved config is the W&B run's config. Every numeric field of ``step``, ``validation`` and ``generator``
  records is logged under the name TensorBoard uses (:func:`~prorl_async.monitor.metrics.tracked_scalars`: ``loss``,
  ``buffer_counters/received``, ``validation/pass_at_1``, ``generator-0/tokens_per_s``); strings, bools and
  non-finite values are left out, and so are ``event`` records.
- The x axis is ``version`` (W&B's ``define_metric``): each record is one W&B row carrying ``version``, the
  record's own for step and validation records (a validation result that arrives steps later still lands on the
  version it measured), the learner's latest for generator records. W&B's ``_step`` only counts rows, so nothing
  is dropped for arriving late, and a resumed run that repeats a few versions shows them twice, as the JSONL does.
- The W&B run id is in ``RUN_DIR/wandb_run_id``, written before the first record: a fresh run gets a new id, a
  resumed one (``--resume``) reuses it with ``resume="allow"``, so the W&B run continues. W&B's own files go to
  ``RUN_DIR/wandb/`` (``WANDB_MODE=offline`` keeps everything there, for ``wandb sync`` later).

Usage::

    sink = WandbSink(cfg, run_dir, resume=False)     # UserError when wandb is not installed
    metrics = MetricsLog(run_dir, sinks=[sink])      # opens it: wandb.init
    metrics.write("step", version=1, loss=0.5)       # -> wandb.log({"version": 1, "loss": 0.5})
    metrics.close()                                  # -> wandb.finish()
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prorl_async.errors import UserError
from prorl_async.monitor.metrics import tracked_scalars
from prorl_async.utils.fs import write_atomic

if TYPE_CHECKING:
    from prorl_async.config import Config, TrackingConfig

RUN_ID_FILE = "wandb_run_id"
INSTALL_HINT = "pip install 'prorl-async[wandb]' (or pip install wandb)"


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line UserError saying how to install it."""
    try:
        import wandb
    except ImportError as err:
        raise UserError(f"tracking.wandb = true needs the wandb package: {INSTALL_HINT}, "
                        "or set tracking.wandb = false") from err
    return wandb


def check_tracking(tracking: TrackingConfig) -> None:
    """At start-up: UserError when a tracker the config asks for is not installed."""
    if tracking.wandb:
        import_wandb()


def tracking_sinks(cfg: Config, run_dir: str | Path, *, resume: bool) -> list[WandbSink]:
    """The sinks ``cfg.tracking`` asks for (none, or W&B), for :class:`~prorl_async.monitor.metrics.MetricsLog`."""
    return [WandbSink(cfg, run_dir, resume=resume)] if cfg.tracking.wandb else []


def run_id(run_dir: str | Path, *, resume: bool) -> str:
    """The W&B run id of ``run_dir``: the stored one when resuming (if any), else a new one; stored either way."""
    path = Path(run_dir) / RUN_ID_FILE
    if resume and path.exists() and (stored := path.read_text().strip()):
        return stored
    new = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
    write_atomic(path, new + "\n")
    return new


class WandbSink:
    """Feeds one W&B run from the metrics log's records (see the module docstring); ``init`` is ``wandb.init``
    unless a test passes a fake (anything returning an object with ``log``, ``define_metric`` and ``finish``).
    ``close`` finishes the run and, with the real ``wandb``, waits until its files are written (``teardown``):
    ``finish`` alone may return before an offline run's history is on disk."""

    name = "wandb"

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool,
                 init: Callable[..., Any] | None = None) -> None:
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self._wandb = import_wandb() if init is None else None
        self._init = init if init is not None else self._wandb.init
        self._run: Any = None
        self._version = 0  # the learner's latest version: the x of generator records

    def open(self) -> None:
        t = self.cfg.tracking
        self._run = self._init(
            project=t.wandb_project, entity=t.wandb_entity or None, name=t.wandb_name or self.run_dir.name,
            tags=list(t.wandb_tags) or None, config=self.cfg.model_dump(mode="json"), dir=str(self.run_dir),
            id=run_id(self.run_dir, resume=self.resume), resume="allow",
            settings={"console": "off"},  # the process logs are RUN_DIR/logs/*.log already
        )
        self._run.define_metric("version")
        self._run.define_metric("*", step_metric="version")

    def write(self, record: dict[str, Any]) -> None:
        kind, version = record.get("kind"), record.get("version")
        has_version = isinstance(version, int) and not isinstance(version, bool)
        if kind in ("step", "event") and has_version:
            self._version = version
        values = tracked_scalars(record)
        if values and self._run is not None:
            x = version if kind in ("step", "validation") and has_version else self._version
            self._run.log({"version": x, **values})

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish()
            if self._wandb is not None:
                self._wandb.teardown()
