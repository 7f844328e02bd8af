"""What a run needs besides the learner to resume exactly: buffered groups, prompt positions, counters.

A checkpoint directory ``RUN_DIR/checkpoints/step-NNNNNN/`` holds the learner's files (``checkpoint.py``)
and, written here, ``buffer.msgpack`` (the replay buffer's groups as wire frames: nothing is pickled),
``samplers.json`` (each generator's prompt-sampler state) and ``service.json`` (the learner service's
counters). It is written under ``step-NNNNNN.partial`` and renamed when complete, so a directory without
the suffix is always whole: :func:`latest_checkpoint` never picks a torn one.

Exactness of the prompt positions (:class:`SamplerLedger`). A generator reports its sampler state with
every status message: its position, the draws it has in flight (re-queued on restore) with their group
sequence numbers, and its next sequence number. A group can reach the learner before or after a status
that still lists it as in flight (its send and the status snapshot race), so the ledger drops from a state
the in-flight draws whose groups it has received, before or since. A state corrected this way re-queues
exactly the prompts whose groups the learner never saw: after a resume (or a generator restart) no prompt
is lost and none is trained on twice. The one window left open: a group queued in a generator's socket
when that process is killed was neither received nor listed in flight, so it is lost (``kill -9`` only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

PARTIAL = ".partial"
_CHECKPOINT_NAME = re.compile(r"step-([0-9]+)")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class _Reported:
    state: dict[str, Any]
    inflight_seqs: list[int]
    """Sequence numbers of ``state["requeued"][:len(inflight_seqs)]``, the draws in flight at the report."""


class SamplerLedger:
    """Each generator's latest sampler state, corrected for the groups the learner has received."""

    def __init__(self, states: dict[str, dict[str, Any]] | None = None) -> None:
        self._reported = {source: _Reported(state, []) for source, state in (states or {}).items()}
        self._received: dict[str, set[int]] = {}

    def on_status(self, source: str, state_json: str, inflight_seqs_json: str | None, next_seq: int) -> None:
        """A generator's status: sampler state, the seqs of the draws it has in flight, its next seq."""
        state = json.loads(state_json)
        seqs = [int(s) for s in json.loads(inflight_seqs_json)] if inflight_seqs_json else []
        if not isinstance(state, dict) or len(seqs) > len(state.get("requeued", [])):
            raise ValueError(f"{source}: malformed sampler state")
        self._reported[source] = _Reported(state, seqs)
        # Only a seq in flight now, or one not started yet, can be listed by a later status: forget the rest.
        listed = set(seqs)
        received = self._received.get(source, set())
        self._received[source] = {s for s in received if s in listed or s >= next_seq}

    def on_group(self, generator_id: int, seq: int) -> bool:
        """A group arrived; True when it changes a saved state (its draw was listed in flight)."""
        source = f"generator-{generator_id}"
        received = self._received.setdefault(source, set())
        if seq in received:
            return False
        received.add(seq)
        reported = self._reported.get(source)
        return reported is not None and seq in reported.inflight_seqs

    def states(self) -> dict[str, dict[str, Any]]:
        """Per generator: the state to restore its sampler from (received in-flight draws removed)."""
        out = {}
        for source, r in self._reported.items():
            received = self._received.get(source, set())
            done = {i for i, seq in enumerate(r.inflight_seqs) if seq in received}
            keep = [d for i, d in enumerate(r.state.get("requeued", [])) if i not in done]
            out[source] = {**r.state, "requeued": keep}
        return out


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


def save_run_state(directory: Path, buffer_state: dict[str, Any], samplers: dict[str, dict[str, Any]],
                   service: dict[str, Any]) -> None:
    (directory / "buffer.msgpack").write_bytes(msgpack.packb(buffer_state, use_bin_type=True))
    (directory / "samplers.json").write_text(json.dumps(samplers, indent=1) + "\n")
    (directory / "service.json").write_text(json.dumps(service, indent=1) + "\n")


def load_run_state(directory: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(buffer state, sampler states, service counters) of a checkpoint written by :func:`save_run_state`."""
    missing = [n for n in ("buffer.msgpack", "samplers.json", "service.json") if not (directory / n).exists()]
    if missing:
        raise ValueError(f"{directory} is not a run checkpoint (missing {', '.join(missing)})")
    buffer_state = msgpack.unpackb((directory / "buffer.msgpack").read_bytes(), raw=False)
    samplers = json.loads((directory / "samplers.json").read_text())
    service = json.loads((directory / "service.json").read_text())
    return buffer_state, samplers, service


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
