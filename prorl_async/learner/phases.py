"""Where a learner step's time goes: wall seconds per phase of ``Learner.train_step``, when asked for.

Off by default. When on, every phase boundary waits for the device (``torch.cuda.synchronize``), because a
CUDA kernel runs after the Python call that queued it returns: without the wait, time queued in one phase
is paid in the next. The waits cost a little throughput, so only benches turn it on::

    learner.phases.enabled = True
    learner.train_step(batch)
    learner.phases.take()   # {"prepare": 0.01, "reference": 0.21, "policy_forward": 0.40, ...}; then cleared

Phases nest in no particular way: each is timed where :class:`Learner` opens it, and a phase opened twice in
a step (once per micro-batch) adds up.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("prepare", "advantage", "proximal", "collate", "reference", "policy_forward", "loss", "backward",
          "optimizer")
"""In the order a step meets them: ``prepare`` (the batch's per-sample views and units; it holds ``advantage``,
the group advantages), ``proximal`` (the no-grad pass of several mini-batches), ``collate`` (micro-batch rows and
masks), ``reference`` (no-grad forward), ``policy_forward``, ``loss`` (the ProRL loss's forward: KL, ratios,
clip), ``backward``, ``optimizer`` (gradient clipping and AdamW)."""


class PhaseTimes:
    """Seconds per phase since the last :meth:`take` (see the module doc)."""

    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.device = device
        self.enabled = enabled
        self._seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds per phase gathered so far (phases never entered are absent), and a fresh start."""
        out, self._seconds = dict(self._seconds), defaultdict(float)
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
