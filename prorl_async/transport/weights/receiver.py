"""Worker side of the weight broadcast: :class:`WeightReceiver` (driven by ``generator/vllm_worker.py`` inside vLLM).

The protocol, membership and failure rules are in ``weight_sync``'s docstring, and so are the exact calls a
generator makes. Here:

- :class:`WeightReceiver` joins the learner's store (a ticket, then its own two-rank group) and receives one
  update per :meth:`~WeightReceiver.receive`, handing the tensors to a loader as views of its receive buffers,
  ``PIPELINE_DEPTH`` buckets in flight; it keeps the protocol in step whatever the loader does (drains what the loader
  left, acknowledges a loader failure), and closes its group after any failure (join again).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from prorl_async.transport.weights.buckets import Bucket, BufferPool, aliases_of, decode_manifest, plan_buckets, unpack
from prorl_async.transport.weights.sender import (
    MAGIC,
    PIPELINE_DEPTH,
    RAW_MAGIC,
    PairGroup,
    WeightSyncError,
    local_address,
    tcp_store,
)

if TYPE_CHECKING:
    from prorl_async.config import WeightSyncConfig

log = logging.getLogger(__name__)


@dataclass
class ReceiveStats:
    """What one :meth:`WeightReceiver.receive` did."""

    version: int
    payload_bytes: int
    buckets: int
    seconds: float
    """From the header's arrival to the ack: transfer and load."""
    header_wait_s: float
    """Waiting for the header (the learner had not started yet)."""
    bucket_wait_s: float
    """Of ``seconds``, blocked on the network; the rest is the loader's (vLLM's reload) own time."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Loader = Callable[[Iterator[tuple[str, torch.Tensor]]], None]


class WeightReceiver:
    """Worker side of one group: joins on construction, then one :meth:`receive` per announced version.

    Usage (a plain process; in vLLM the extension below does this)::

        rx = WeightReceiver(cfg, host, port, member="gen0.rank0")  # blocks until the learner accepted
        stats = rx.receive(lambda weights: model.load_weights(weights))
        rx.close()

    After any :class:`WeightSyncError` the group is closed: construct a new receiver to join again.
    """

    def __init__(self, cfg: WeightSyncConfig, host: str, port: int, member: str,
                 device: torch.device | str = "cpu", holds_version: int | None = None) -> None:
        self.cfg, self.member = cfg, member
        self.group: PairGroup | None = None
        try:
            self._store = tcp_store(host, port, False, cfg.timeout_s)
            self.backend = self._store.get("ws/backend").decode()
            device = torch.device(device)
            if self.backend == "nccl" and device.type != "cuda":
                raise WeightSyncError(f"the learner broadcasts over NCCL but this worker is on {device}")
            self.device = device if self.backend == "nccl" else torch.device("cpu")
            ticket = self._store.add("ws/tickets", 1)
            join = {"member": member} if holds_version is None else {"member": member, "version": holds_version}
            self._store.set(f"ws/join/{ticket}", json.dumps(join))
            # Twice the sender's timeout: the sender may wait one timeout on a stuck member before it sends this
            # member the next bucket, and that must not make a healthy worker give up.
            self.group = PairGroup(self._store, f"ws/g/{ticket}/", 1, self.backend, self.device, 2 * cfg.timeout_s,
                                local_address(host, port))
            self._store.wait([f"ws/g/{ticket}/after"])
            self.after_version = int(self._store.get(f"ws/g/{ticket}/after"))
            """Versions up to this one were sent before this receiver joined: it gets every later one."""
        except Exception as err:
            self.close()
            if isinstance(err, WeightSyncError):
                raise
            raise WeightSyncError(f"weight_sync {member}: could not join the learner's group at {host}:{port} "
                                  f"within {cfg.timeout_s:g} s: {err}") from err
        self.version: int | None = None
        self._pool = BufferPool(self.device, keep=PIPELINE_DEPTH + 1)

    def receive(self, load: Loader, expected_version: int | None = None) -> ReceiveStats:
        """Receive the next update and hand it to ``load`` as an iterator of (name, tensor) views.

        Raises :class:`WeightSyncError` on a transport or protocol failure, or what ``load`` raised (after
        acknowledging the failure to the sender); either way the group is closed afterwards.
        """
        group = self._joined()
        called = time.perf_counter()
        magic, version, manifest_nbytes, payload = self._recv(torch.empty(4, dtype=torch.int64), "header").tolist()
        start = time.perf_counter()
        if magic != MAGIC:
            self._fail(f"bad header magic {magic:#x} (out of step with the sender)")
        if expected_version is not None and version != expected_version:
            log.warning("weight_sync: expected version %d, the learner sent %d", expected_version, version)
        raw = self._recv(torch.empty(manifest_nbytes, dtype=torch.uint8), "manifest").cpu().numpy().tobytes()
        try:
            entries, bucket_bytes = decode_manifest(raw)
        except ValueError as err:
            self._fail(str(err))
        if sum(e.nbytes for e in entries) != payload:
            self._fail(f"manifest describes {sum(e.nbytes for e in entries)} bytes, header says {payload}")
        plan = plan_buckets(entries, bucket_bytes)
        stream = _BucketStream(group, plan, self._pool, aliases_of(entries))
        if not self.cfg.stream:
            stream.stage()
            if stream.error is not None:
                self._fail(str(stream.error))
        load_error: BaseException | None = None
        try:
            load(stream.items)
        except Exception as err:  # acknowledged as a failure below; the protocol stays in step
            load_error = err
        stream.drain()
        if stream.error is not None:
            mix = " (partial: the engine now holds a mix of old and new weights)" if stream.yielded else ""
            self._fail(f"version {version}{mix}: {stream.error}", partial=stream.yielded > 0)
        ack = torch.tensor([version, 0 if load_error is None else 1], dtype=torch.int64, device=self.device)
        self._wait(group.broadcast(ack, 1), "ack")
        self._pool.trim()
        if load_error is not None:
            self.close()  # the sender drops a member that failed to load: join again
            raise load_error
        self.version = version
        return ReceiveStats(version, payload, len(plan), time.perf_counter() - start, start - called, stream.wait_s)

    def raw_broadcast(self) -> int:
        """Counterpart of :meth:`WeightSender.raw_broadcast`; returns the bytes per repeat."""
        group = self._joined()
        magic, repeats, nbytes, _ = self._recv(torch.empty(4, dtype=torch.int64), "raw header").tolist()
        if magic != RAW_MAGIC:
            self._fail(f"expected a raw broadcast, got magic {magic:#x}")
        buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        ack = torch.zeros(1, dtype=torch.int64, device=self.device)
        for _ in range(repeats):
            self._wait(group.broadcast(buf, 0), "raw buffer")
            self._wait(group.broadcast(ack, 1), "raw ack")
        return nbytes

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    # ------------------------------------------------------------------------------------- internals

    def _joined(self) -> PairGroup:
        if self.group is None:
            raise WeightSyncError(f"{self.member}: not in a weight group (join again)")
        return self.group

    def _recv(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        tensor = tensor.to(self.device)
        self._wait(self._joined().broadcast(tensor, 0), what)
        return tensor

    def _wait(self, work: Any, what: str) -> None:
        try:
            self._joined().wait(work, what)
        except WeightSyncError as err:
            self._fail(str(err))

    def _fail(self, message: str, partial: bool = False) -> None:
        self.close()
        raise WeightSyncError(f"weight_sync {self.member}: {message}", partial=partial)


class _BucketStream:
    """Receives the planned buckets, ``PIPELINE_DEPTH`` in flight, and yields their tensors as views.

    A transport failure ends the iteration quietly (so that vLLM finalizes what it loaded) and is kept in
    ``error``; :meth:`drain` receives whatever the consumer left, keeping the protocol in step.
    """

    def __init__(self, group: PairGroup, plan: list[Bucket], pool: BufferPool, aliases: dict[str, list[str]]) -> None:
        self._group, self._plan, self._pool, self._aliases = group, plan, pool, aliases
        self._pending: deque[tuple[int, torch.Tensor, Any]] = deque()
        self._staged: list[torch.Tensor] | None = None
        self._posted = 0
        self.yielded = 0
        self.wait_s = 0.0
        self.error: WeightSyncError | None = None
        self.items = self._iterate()

    def stage(self) -> None:
        """Receive every bucket before anything is yielded (a failure leaves the consumer untouched)."""
        staged = []
        try:
            for k, bucket in enumerate(self._plan):
                flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self._group.device)
                self._group.wait(self._group.broadcast(flat, 0), f"bucket {k}")
                staged.append(flat)
        except WeightSyncError as err:
            self.error = err
        self._staged = staged

    def drain(self) -> None:
        for _ in self.items:
            pass

    def _iterate(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._staged is not None:
            if self.error is None:
                for bucket, flat in zip(self._plan, self._staged, strict=True):
                    yield from self._yield(bucket, flat)
            return
        try:
            self._post()
            while self._pending:
                k, flat, work = self._pending.popleft()
                t0 = time.perf_counter()
                self._group.wait(work, f"bucket {k}")
                self.wait_s += time.perf_counter() - t0
                self._post()  # the next receive runs while vLLM loads this bucket
                yield from self._yield(self._plan[k], flat)
        except WeightSyncError as err:
            self.error = err
        finally:
            self._pending.clear()

    def _yield(self, bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in unpack(bucket, flat):
            for alias in [name, *self._aliases.get(name, ())]:  # a tied weight under each of its names
                self.yielded += 1
                yield alias, tensor

    def _post(self) -> None:
        while self._posted < len(self._plan) and len(self._pending) < PIPELINE_DEPTH:
            k = self._posted
            flat = self._pool.take(self._plan[k].nbytes)
            self._pending.append((k, flat, self._group.broadcast(flat, 0)))
            self._posted += 1


def split_request_id(internal_id: str) -> tuple[str, int]:
    """vLLM's internal request id -> (request id, sample index): ``"3_abc-1f2e3d4c"`` -> ``("abc", 3)``."""
    base = internal_id.rsplit("-", 1)[0] if len(internal_id) > 9 and internal_id[-9] == "-" else internal_id
    index, sep, rest = base.partition("_")
    return (rest, int(index)) if sep and index.isdigit() else (base, 0)
