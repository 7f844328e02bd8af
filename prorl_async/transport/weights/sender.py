"""Weight broadcast, learner -> generators: versioned, bucketed, every collective under a timeout.

Membership. The learner's :class:`WeightSender` owns a TCP store at ``weight_sync.host:port``. Each
generator worker joins with its *own* two-rank group (learner rank 0, worker rank 1), built on demand
from that store: a dead or stuck peer breaks only its own group, and a restarted generator simply joins
again (a new ticket, a new group) while the learner keeps running. Join protocol, on the store:
the worker takes ticket ``t = add("ws/tickets", 1)`` and writes ``ws/join/{t}``; the sender's accept
thread builds rank 0 of the group under prefix ``ws/g/{t}/`` while the worker builds rank 1 (gloo: a
few ms), then writes ``ws/g/{t}/after``: the last version whose broadcast had already started, or the
version the worker says it already holds when that is older. The worker gets every later version and
none before it. Catch-up: a member that holds an older version than the learner's current one (a
restarted generator starts from the base weights; a resumed run starts past them) is listed by
:meth:`WeightSender.behind`, and ``broadcast(current, weights, members=those)`` sends it the current
version again without disturbing the others — without it a lone restarted generator would wait for an
update that only comes after the learner's next step, which waits for that generator's groups.
One backend for all groups: NCCL when the learner's weights are on CUDA (``backend=auto``), gloo
otherwise, announced in ``ws/backend``.

One update on one group, all broadcasts (src 0 unless said):

1. header   ``int64[4] = [MAGIC, version, manifest_nbytes, payload_nbytes]``;
2. manifest ``uint8[manifest_nbytes]``: JSON ``{"bucket_bytes": B, "tensors": [[name, dtype, shape(, alias_of)]]}``;
3. buckets  ``uint8[nbytes]`` each, planned identically on both sides from the manifest (``plan_buckets``);
4. ack      ``int64[2] = [version, status]`` from src 1: 0 when the worker loaded it, 1 when not.

The layout (aligned byte buckets, tied weights sent once as aliases, a lone bucket for a tensor over the
size) lives in ``weight_buckets``, the worker side in ``weight_receiver``. The sender packs bucket k+1 while
bucket k is on the wire; the worker posts the receive of bucket k+1 before handing bucket k to
``reload_weights`` (streaming) and hands vLLM views of its receive buffers (no copy). No weights travel
through pickle.

Failures. Every wait of the sender has ``timeout_s``. A dead peer fails at once ("Connection closed by
peer"), a stuck one at the timeout; the sender drops that member, reports it in :class:`BroadcastStats`
and goes on with the others. Workers wait ``2 * timeout_s``: while the sender waits on a stuck member,
the others see a pause of up to one timeout between two buckets, which must not make them give up. A
group that failed is unusable: both sides discard it and the worker joins again (``weight_sync_join``, a
new ``WeightReceiver``). On the worker, a sender that fails *before* the first bucket leaves the engine's
weights untouched; one that fails mid-stream leaves a mix of old and new layers (``WeightSyncError`` with
``partial=True``, and "partial" in its message, which is all that crosses vLLM's RPC): the generator must
stop sampling until the next full update — or set ``weight_sync.stream = false`` to stage the whole
update before loading it.

Learner side (the caller publishes ``WeightsReady(version)`` on the control socket, then)::

    sender = WeightSender(cfg.weight_sync, device=learner_device)   # port 0: sender.port is the real one
    stats = sender.broadcast(version, learner.weights())            # blocks until every member acked
    stats.failed                                                    # {member: error}: dropped, may rejoin
    if sender.behind(version):                                      # a member joined with older weights
        sender.broadcast(version, learner.weights(), members=sender.behind(version))  # (re-announce first)
    sender.close()

Generator side (``AsyncLLM`` built with ``worker_extension_cls=EXTENSION``; subscribe to control first)::

    [info] = await engine.collective_rpc("weight_sync_join",
                                         args=(cfg.weight_sync.model_dump(), host, port, gid, loaded_version))
    # on WeightsReady(v) with v > max(info["after_version"], loaded_version):
    await engine.pause_generation(mode="keep", clear_cache=False)     # no engine step during the swap
    try:
        [got] = await engine.collective_rpc("weight_sync_receive", args=(v,))
        await engine.reset_prefix_cache(reset_running_requests=True)  # KV of the old weights is stale
    finally:
        await engine.resume_generation()
    # got["version"]: the version now loaded (set it with engine.update_weight_version before resuming to
    # have vLLM label later tokens); got["inflight_tokens"]: {vLLM request id: output tokens sampled before
    # the swap}: tokens at or past that index carry got["version"]. Internal ids are
    # "{index}_{request_id}-{8 chars}" for n > 1 (weight_receiver.split_request_id).
    # On an exception from weight_sync_receive: the group is gone; call "weight_sync_join" again.
    await engine.collective_rpc("weight_sync_leave")                  # at shutdown

On a one-GPU H100 (NCCL 2.28.9): CUDA buckets round-trip; the NCCL groups form over the store, and NCCL's
refusal of two ranks on one device ("invalid usage", at the lazy communicator init of the first broadcast)
reaches the sender as a per-member failure, not a hang. Unchecked until a two-GPU machine: a delivery over
NCCL, and ``Work.wait(timeout)`` then ``abort()`` on a stuck NCCL peer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from prorl_async.transport.weights.buckets import (
    ALIGN,
    Bucket,
    encode_manifest,
    entries_of,
    pack,
    plan_buckets,
)

if TYPE_CHECKING:
    from prorl_async.config import WeightSyncConfig

log = logging.getLogger(__name__)

EXTENSION = "prorl_async.generator.vllm_worker.WeightSyncWorkerExtension"
"""Pass as vLLM's ``worker_extension_cls`` (a name: the transport never imports the generator)."""

MAGIC = 0x5052_4C57_5359_4E43  # "PRLWSYNC"
RAW_MAGIC = MAGIC + 1
PIPELINE_DEPTH = 2
"""Buckets in flight per group, on each side."""


class WeightSyncError(RuntimeError):
    """A collective failed or timed out, or a peer broke the protocol; the group it happened on is discarded.

    ``partial``: the engine received part of an update before the failure (its weights are a mix).
    """

    def __init__(self, message: str, *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


# -------------------------------------------------------------------------------------------- groups


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` -> NCCL for CUDA weights, gloo otherwise; NCCL for CPU weights is a configuration error."""
    device = torch.device(device)
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"weight_sync.backend = 'nccl' needs CUDA weights (the learner's are on {device})")
    return backend


class PairGroup:
    """One two-rank process group (learner 0, worker 1) that leaves torch's default group alone."""

    def __init__(self, store: Any, prefix: str, rank: int, backend: str, device: torch.device,
                 timeout_s: float, hostname: str) -> None:
        from torch.distributed import PrefixStore

        self.backend, self.device, self.timeout_s = backend, device, timeout_s
        self._timeout = timedelta(seconds=timeout_s)
        self.store = PrefixStore(prefix, store)  # kept: NCCL exchanges its unique id on first use
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            opts._timeout = self._timeout
            opts._devices = [ProcessGroupGloo.create_device(hostname=hostname)]
            opts._threads = 2
            self.pg = ProcessGroupGloo(self.store, rank, 2, opts)
        else:
            from torch.distributed import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            # The watchdog's own timeout stays longer than ours, so that our wait raises first and we abort
            # the communicator ourselves; error handling 0 keeps the watchdog from killing the process.
            opts._timeout = timedelta(seconds=2 * timeout_s + 30)
            saved = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
            try:
                self.pg = ProcessGroupNCCL(self.store, rank, 2, opts)
            finally:
                if saved is None:
                    os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
                else:
                    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = saved

    def broadcast(self, tensor: torch.Tensor, src: int) -> Any:
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        opts.timeout = self._timeout
        try:
            return self.pg.broadcast([tensor], opts)
        except Exception as err:  # a group already broken refuses new work
            raise WeightSyncError(f"broadcast refused: {err}") from err

    def wait(self, work: Any, what: str) -> None:
        """Block until ``work`` is done; any failure or a timeout becomes a :class:`WeightSyncError`."""
        try:
            work.wait(self._timeout)
        except Exception as err:
            raise WeightSyncError(f"{what} failed within {self.timeout_s:g} s: {err}") from err

    def close(self) -> None:
        """Abort the group (pending operations fail at once); it cannot be used again."""
        try:
            self.pg.abort()
        except Exception as err:  # already broken: nothing left to release
            log.debug("weight_sync: abort of a %s group: %s", self.backend, err)


def local_address(host: str, port: int) -> str:
    """The address of this host's interface that reaches ``host`` (gloo binds there)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port or 1))  # no packet is sent: only selects the route
        return s.getsockname()[0]


def tcp_store(host: str, port: int, master: bool, timeout_s: float) -> Any:
    """A client of the store at ``host:port``, or (``master``) the store itself, listening on ``host`` only.

    torch's store binds every interface when it opens its own socket; the master is handed a socket bound to
    ``host`` instead (``master_listen_fd``), so a store on loopback cannot be reached from another machine and one
    on a cluster interface only from that network.
    """
    from torch.distributed import TCPStore

    if not master:
        return TCPStore(host, port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(512)
        store = TCPStore(host, listener.getsockname()[1], None, True, timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it with itself
    return store


# -------------------------------------------------------------------------------------------- sender


@dataclass
class BroadcastStats:
    """What one :meth:`WeightSender.broadcast` did."""

    version: int
    payload_bytes: int
    """Bytes of the tensors, once (each member received them all)."""
    buckets: int
    seconds: float
    delivered: list[str] = field(default_factory=list)
    """Members that acknowledged ``version`` as loaded."""
    failed: dict[str, str] = field(default_factory=dict)
    """Members that failed (one line each); their groups are dropped, they may join again."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Member:
    key: str
    group: PairGroup
    ticket: int
    version: int
    """The version this member holds: what it said at join (or ``after``), then each acknowledged one."""
    error: str = ""


class WeightSender:
    """Learner side: the store, the accept thread, and :meth:`broadcast` to every member.

    ``broadcast`` and ``raw_broadcast`` are called from one thread at a time; joins are accepted at any
    time by a background thread (a generator that joins mid-broadcast gets the next version).
    """

    def __init__(self, cfg: WeightSyncConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.backend = resolve_backend(cfg.backend, self.device)
        if self.backend == "gloo":
            self.device = torch.device("cpu")
        self._bucket_bytes = max(ALIGN, int(cfg.bucket_mb * (1 << 20)))
        self._store = tcp_store(cfg.host, cfg.port, True, cfg.timeout_s)
        self.port: int = self._store.port
        self._store.set("ws/backend", self.backend)
        self._lock = threading.Lock()
        self._members: dict[str, _Member] = {}
        self._last_version = -1
        self._ring: list[torch.Tensor] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="weight-sync-accept", daemon=True)
        self._acceptor.start()

    @property
    def members(self) -> list[str]:
        with self._lock:
            return sorted(self._members)

    def wait_for_members(self, count: int, timeout_s: float) -> list[str]:
        """Block until at least ``count`` members have joined (start-up); raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        while len(self.members) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight_sync: {len(self.members)} of {count} generators joined in {timeout_s:g} s")
            time.sleep(0.01)
        return self.members

    def behind(self, version: int) -> list[str]:
        """Members that hold an older version than ``version`` (joined late, or restarted): catch them up."""
        with self._lock:
            return sorted(m.key for m in self._members.values() if m.version < version)

    def broadcast(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
                  members: Iterable[str] | None = None) -> BroadcastStats:
        """Send ``version`` to every current member (or only to ``members``); returns when each acked or failed.

        A broadcast to everyone needs a newer version than the last one; a catch-up (``members`` given) may
        repeat the last version, to members that hold an older one. The tensors must not change until this
        returns (it sends contiguous ones in place).
        """
        named = list(named_tensors)
        entries = entries_of(named)
        plan = plan_buckets(entries, self._bucket_bytes)
        manifest = encode_manifest(entries, self._bucket_bytes)
        with self._lock:
            if members is None:
                if version <= self._last_version:
                    raise ValueError(
                        f"weight_sync: version {version} after {self._last_version}: versions must increase")
                targets = list(self._members.values())
            else:
                if version < self._last_version:
                    raise ValueError(f"weight_sync: catch-up to version {version}, older than {self._last_version}")
                wanted = set(members)
                targets = [m for m in self._members.values() if m.key in wanted and m.version < version]
            self._last_version = version
        start = time.perf_counter()
        payload = sum(e.nbytes for e in entries)
        run = _Broadcast(targets)
        header = torch.tensor([MAGIC, version, len(manifest), payload], dtype=torch.int64, device=self.device)
        mbuf = torch.frombuffer(bytearray(manifest), dtype=torch.uint8).to(self.device)
        run.finish(run.start(header, 0, "header") + run.start(mbuf, 0, "manifest"))
        inflight: deque[list] = deque()
        tensors = iter(t for e, (_, t) in zip(entries, named, strict=True) if not e.alias_of)
        for k, bucket in enumerate(plan):
            if len(inflight) == PIPELINE_DEPTH:
                run.finish(inflight.popleft())
            parts = [next(tensors) for _ in bucket.slots]
            inflight.append(run.start(self._flat(bucket, parts, k % PIPELINE_DEPTH), 0, f"bucket {k}"))
        while inflight:
            run.finish(inflight.popleft())
        acks = {m.key: torch.zeros(2, dtype=torch.int64, device=self.device) for m in run.live}
        run.finish(run.start(lambda m: acks[m.key], 1, "ack"))
        for m in list(run.live):
            if acks[m.key].tolist() != [version, 0]:
                run.fail(m, f"the worker did not load version {version} (ack {acks[m.key].tolist()})")
            else:
                m.version = version
        stats = BroadcastStats(version, payload, len(plan), time.perf_counter() - start,
                               sorted(m.key for m in targets if m.key not in run.failed), dict(run.failed))
        self._drop([m for m in targets if m.key in run.failed])
        return stats

    def raw_broadcast(self, nbytes: int, repeats: int = 3) -> dict[str, list[float]]:
        """The transport's limit, for benchmarks: one flat ``nbytes`` buffer + an 8-byte ack, timed per repeat.

        The worker must call :meth:`WeightReceiver.raw_broadcast` at the same time.
        """
        buf = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            members = list(self._members.values())
        run = _Broadcast(members)
        header = torch.tensor([RAW_MAGIC, repeats, nbytes, 0], dtype=torch.int64, device=self.device)
        run.finish(run.start(header, 0, "raw header"))
        times: dict[str, list[float]] = {m.key: [] for m in members}
        ack = torch.zeros(1, dtype=torch.int64, device=self.device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            run.finish(run.start(buf, 0, "raw buffer"))
            for m in list(run.live):
                run.finish(run.start(ack, 1, "raw ack", only=m))
                times[m.key].append(time.perf_counter() - t0)
        self._drop([m for m in members if m.key in run.failed])
        if run.failed:
            raise WeightSyncError(f"raw broadcast failed: {run.failed}")
        return times

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(timeout=self.cfg.timeout_s + 5)
        with self._lock:
            members, self._members = list(self._members.values()), {}
        for m in members:
            m.group.close()

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- internals

    def _flat(self, bucket: Bucket, parts: list[torch.Tensor], slot: int) -> torch.Tensor:
        if len(parts) == 1 and parts[0].is_contiguous() and parts[0].device == self.device:
            return parts[0].detach().reshape(-1).view(torch.uint8)  # one tensor: send it in place
        need = max(bucket.nbytes, self._bucket_bytes if bucket.nbytes <= self._bucket_bytes else 0)
        while len(self._ring) <= slot:
            self._ring.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._ring[slot].numel() < need:
            self._ring[slot] = torch.empty(need, dtype=torch.uint8, device=self.device)
        return pack(bucket, parts, self._ring[slot])

    def _drop(self, failed: list[_Member]) -> None:
        for m in failed:
            with self._lock:
                if self._members.get(m.key) is m:
                    del self._members[m.key]
            m.group.close()
            log.warning("weight_sync: dropped %s: %s", m.key, m.error)

    def _accept_loop(self) -> None:
        client = tcp_store(self.cfg.host, self.port, False, self.cfg.timeout_s)
        ticket, since = 1, time.monotonic()
        while not self._closed.is_set():
            key = f"ws/join/{ticket}"
            if not client.check([key]):
                # A joiner that died between taking its ticket and writing it must not block the others.
                if time.monotonic() - since > self.cfg.timeout_s and client.add("ws/tickets", 0) > ticket:
                    ticket, since = ticket + 1, time.monotonic()
                self._closed.wait(0.05)
                continue
            info = json.loads(client.get(key))
            try:
                self._accept(client, ticket, info)
            except Exception as err:
                log.warning("weight_sync: join of %s (ticket %d) failed: %s", info.get("member"), ticket, err)
            ticket, since = ticket + 1, time.monotonic()

    def _accept(self, client: Any, ticket: int, info: dict[str, Any]) -> None:
        group = PairGroup(self._store, f"ws/g/{ticket}/", 0, self.backend, self.device, self.cfg.timeout_s,
                       local_address(self.cfg.host, self.port))
        held = info.get("version")
        with self._lock:
            old = self._members.get(info["member"])
            after = self._last_version if not isinstance(held, int) else min(held, self._last_version)
            self._members[info["member"]] = _Member(info["member"], group, ticket, held if isinstance(held, int)
                                                    else after)
        client.set(f"ws/g/{ticket}/after", str(after))
        log.info("weight_sync: %s joined (ticket %d, gets versions after %d)", info["member"], ticket, after)
        if old is not None:
            old.group.close()


class _Broadcast:
    """Bookkeeping of one broadcast over many groups: which members are still live, which failed and why."""

    def __init__(self, members: list[_Member]) -> None:
        self.live = list(members)
        self.failed: dict[str, str] = {}

    def start(self, tensor: torch.Tensor | Callable[[_Member], torch.Tensor], src: int, what: str,
              only: _Member | None = None) -> list[tuple[_Member, Any, torch.Tensor, str]]:
        """Post one broadcast on every live group (or ``only``); ``tensor`` may be per member."""
        pending = []
        for m in [only] if only is not None else list(self.live):
            t = tensor(m) if callable(tensor) else tensor
            try:
                pending.append((m, m.group.broadcast(t, src), t, what))
            except Exception as err:
                self.fail(m, f"{what}: {err}")
        return pending

    def finish(self, pending: list[tuple[_Member, Any, torch.Tensor, str]]) -> None:
        for m, work, _, what in pending:
            if m.key in self.failed:
                continue
            try:
                m.group.wait(work, what)
            except WeightSyncError as err:
                self.fail(m, str(err))

    def fail(self, m: _Member, error: str) -> None:
        m.error = self.failed[m.key] = error.splitlines()[0][:500] if error else "failed"
        self.live = [x for x in self.live if x is not m]
