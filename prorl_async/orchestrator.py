"""``prorl-async run``: prepare the run directory and the model, then run what exists of the pipeline.

The trio supervisor that joins generators, learner and weight broadcast lands with the orchestrator
issue; until then ``run`` does the parts that exist and says plainly what it did not do.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prorl_async.config import Config, write_resolved


def make_run_dir(cfg: Config) -> Path:
    """Expand ``{timestamp}`` in ``run.run_dir`` and create it (a fresh directory per run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.run.run_dir.replace("{timestamp}", stamp))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cfg: Config, resume: str | None = None) -> int:
    from prorl_async.errors import UserError
    from prorl_async.models import resolve_model

    if resume is not None:
        raise UserError("--resume needs the training loop, which is not available yet")
    run_dir = make_run_dir(cfg)
    config_path = write_resolved(cfg, run_dir)
    print(f"run directory: {run_dir}  (resolved config: {config_path})", flush=True)
    t0 = time.perf_counter()
    model_dir = resolve_model(cfg.model.name)
    print(f"model {cfg.model.name}: {model_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(
        "prorl-async: the end-to-end trainer (generators + learner + weight broadcast) is not available yet; "
        "this run validated the config and prepared the model.",
        file=sys.stderr,
    )
    return 0
