"""Paths and files of a run directory: checkpoints (which one is newest, written atomically) and the run state.

A checkpoint directory ``RUN_DIR/checkpoints/step-NNNNNN/`` holds the learner's files (``learner/checkpoint.py``)
and, written here, ``buffer.msgpack`` (the replay buffer's groups as wire frames: nothing is pickled),
``prompts.json`` (the learner's prompt order with the requests in flight re-queued: ``PromptSource.state``) and
``service.json`` (the learner service's counters). It is written under ``step-NNNNNN.partial`` and renamed when
complete, so a directory without the suffix is always whole: :func:`latest_checkpoint` never picks a torn one.

A checkpoint written before the learner owned the prompt order has ``samplers.json`` (one prompt position per
generator) instead of ``prompts.json``: :func:`load_run_state` returns it as ``{"shards": {...}}`` and the learner
merges it (``learner.prompts.merge_shard_states``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import msgpack

PARTIAL = ".partial"
_CHECKPOINT_NAME = re.compile(r"step-([0-9]+)")


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint's name, ``step-<digits>``; None for anything else (``.partial``, junk)."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(run_dir: Path, *, holding: str | None = None) -> Path | None:
    """The newest complete checkpoint ``RUN_DIR/checkpoints/step-<digits>``, or None: the one pick everyone uses.

    Only directories named ``step-<digits>`` count (a torn ``step-N.partial``, a stray file or any other name
    never does), ordered by the number, not the string. ``holding``: a relative path the checkpoint must
    contain (``policy/config.json`` for a loadable policy); checkpoints without it are passed over.
    """
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir()]
    done = [(step, p) for step, p in steps if holding is None or (p / holding).exists()]
    return max(done)[1] if done else None


def save_run_state(directory: Path, buffer_state: dict[str, Any], prompts: dict[str, Any],
                   service: dict[str, Any]) -> None:
    (directory / "buffer.msgpack").write_bytes(msgpack.packb(buffer_state, use_bin_type=True))
    (directory / "prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    (directory / "service.json").write_text(json.dumps(service, indent=1) + "\n")


def load_run_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(buffer state, prompt order, service counters) of a checkpoint written by :func:`save_run_state` (or, for the
    prompt order, ``{"shards": per-generator sampler states}`` from an older checkpoint)."""
    prompts_file = "prompts.json" if (directory / "prompts.json").exists() else "samplers.json"
    missing = [n for n in ("buffer.msgpack", prompts_file, "service.json") if not (directory / n).exists()]
    if missing:
        raise ValueError(f"{directory} is not a run checkpoint (missing {', '.join(missing)})")
    buffer_state = msgpack.unpackb((directory / "buffer.msgpack").read_bytes(), raw=False)
    prompts = json.loads((directory / prompts_file).read_text())
    if prompts_file == "samplers.json":
        prompts = {"shards": prompts}
    service = json.loads((directory / "service.json").read_text())
    return buffer_state, prompts, service


def begin(directory: Path) -> Path:
    """The temporary directory to write ``directory``'s checkpoint into (emptied if a crash left one)."""
    tmp = directory.with_name(directory.name + PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def commit(tmp: Path, directory: Path) -> Path:
    """Make the checkpoint written into ``tmp`` appear as ``directory`` (replacing an older one)."""
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
