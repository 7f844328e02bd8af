"""Weight broadcast without vLLM: bucket planning and round trips, then real gloo groups between this process
and peer processes (this file run as a script): delivery, a peer dying mid-broadcast, a stuck peer, a silent
sender, a failed load, and a member that rejoins and gets the next version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prorl_async.config import WeightSyncConfig
from prorl_async.transport.weights.buckets import (
    ALIGN,
    BufferPool,
    TensorEntry,
    aliases_of,
    decode_manifest,
    encode_manifest,
    entries_of,
    pack,
    plan_buckets,
    unpack,
)
from prorl_async.transport.weights.receiver import WeightReceiver, split_request_id
from prorl_async.transport.weights.sender import WeightSender, WeightSyncError, resolve_backend

TIMEOUT_S = 4.0
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]

# ------------------------------------------------------------------------------------ planning, no I/O


def named_tensors(seed: int, sizes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (shape, dtype) in enumerate(zip(sizes, dtypes, strict=True)):
        t = torch.randn(shape, generator=g) * 10
        out.append((f"layer.{i}.w", t > 0 if dtype == torch.bool else t.to(dtype)))
    return out


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=12),
    bucket_bytes=st.integers(1, 400),
    seed=st.integers(0, 1000),
)
def test_plan_pack_unpack_round_trip(specs, bucket_bytes, seed) -> None:
    named = named_tensors(seed, [s for s, _ in specs], [d for _, d in specs])
    entries = entries_of(named)
    plan = plan_buckets(entries, bucket_bytes)
    assert [e for b in plan for e, _ in b.slots] == entries  # every tensor once, in order
    for b in plan:
        ends = 0
        for e, offset in b.slots:
            assert offset % ALIGN == 0 and offset >= ends  # aligned, no overlap
            ends = offset + e.nbytes
        assert b.nbytes == ends
        assert b.nbytes <= bucket_bytes or len(b.slots) == 1  # only a lone tensor may exceed the size
    got = []
    source = iter(t for _, t in named)
    for b in plan:
        flat = pack(b, [next(source) for _ in b.slots], torch.empty(max(b.nbytes, bucket_bytes), dtype=torch.uint8))
        got += [(n, t.clone()) for n, t in unpack(b, flat.clone())]
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, want), (_, have) in zip(named, got, strict=True):
        assert have.dtype == want.dtype and have.shape == want.shape and torch.equal(have, want)


def test_plan_is_greedy_and_keeps_big_tensors_whole() -> None:
    entries = [TensorEntry("a", "float32", (10,)), TensorEntry("b", "float32", (100,)), TensorEntry("c", "int8", (3,))]
    plan = plan_buckets(entries, 128)
    assert [[e.name for e, _ in b.slots] for b in plan] == [["a"], ["b"], ["c"]]
    assert plan[1].nbytes == 400  # bigger than the bucket: alone
    plan = plan_buckets(entries[:1] + entries[2:], 128)
    assert [[(e.name, o) for e, o in b.slots] for b in plan] == [[("a", 0), ("c", 64)]]


def test_manifest_round_trip_and_rejections() -> None:
    entries = [TensorEntry("x.weight", "bfloat16", (3, 4)), TensorEntry("s", "float32", ())]
    assert decode_manifest(encode_manifest(entries, 1024)) == (entries, 1024)
    bad = [
        b"[]",
        b'{"bucket_bytes": 0, "tensors": []}',
        b'{"bucket_bytes": 8, "tensors": [["a", "complex64", [1]]]}',
        b'{"bucket_bytes": 8, "tensors": [["a", "float32", [-1]]]}',
        b'{"bucket_bytes": 8, "tensors": [["a", "float32", [1]], ["a", "float32", [1]]]}',
        b'{"bucket_bytes": 8, "tensors": [], "extra": 1}',
    ]
    for data in bad:
        with pytest.raises(ValueError):
            decode_manifest(data)


def test_tied_weights_travel_once_as_aliases() -> None:
    embed = torch.randn(4, 3)
    named = [("embed", embed), ("norm", torch.ones(3)), ("lm_head.weight", embed), ("view", embed[:2])]
    entries = entries_of(named)
    assert [e.alias_of for e in entries] == [None, None, "embed", None]  # a view is not the same tensor
    assert entries[2].nbytes == 0 and [e.name for b in plan_buckets(entries, 1 << 20) for e, _ in b.slots] == [
        "embed", "norm", "view"]
    decoded, _ = decode_manifest(encode_manifest(entries, 1 << 20))
    assert decoded == entries and aliases_of(decoded) == {"embed": ["lm_head.weight"]}
    unknown = [["a", "float32", [2]], ["b", "float32", [2], "zzz"]]
    reshaped = [["a", "float32", [2]], ["b", "float32", [3], "a"]]
    for bad in (unknown, reshaped):
        with pytest.raises(ValueError):
            decode_manifest(json.dumps({"bucket_bytes": 8, "tensors": bad}).encode())


def test_buffer_pool_reuses_only_unreferenced_buffers() -> None:
    pool = BufferPool(torch.device("cpu"), keep=1)
    a = pool.take(1000)
    first = a.data_ptr()
    held = a[64:128].view(torch.float32)  # what a loader may keep (vLLM's layer-wise reload does)
    del a
    b = pool.take(1000)
    second = b.data_ptr()
    assert second != first  # the first buffer is still viewed: never handed out again meanwhile
    del b
    assert pool.take(500).data_ptr() == second  # free again: reused
    del held
    assert pool.take(1000).data_ptr() in (first, second)
    pool.trim()
    assert len(pool._bufs) == 1


def test_split_request_id_and_backend() -> None:
    assert split_request_id("abc-1f2e3d4c") == ("abc", 0)
    assert split_request_id("3_p-7-1f2e3d4c") == ("p-7", 3)
    assert split_request_id("plain") == ("plain", 0)
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("auto", "cuda:1") == "nccl"
    assert resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("nccl", "cpu")


# ---------------------------------------------------------------------------------- gloo, two processes


def cfg(**kw) -> WeightSyncConfig:
    return WeightSyncConfig(**{"timeout_s": TIMEOUT_S, "bucket_mb": 0.25, **kw})


def weights(version: int) -> list[tuple[str, torch.Tensor]]:
    """~6 MB in mixed dtypes (more than loopback socket buffers hold), different for every version, and a tied
    weight (the same tensor under a second name, as ``Learner.weights()`` yields a tied head)."""
    sizes = [(256, 1024), (1024,), (512, 1024), (3,), (1000, 1001)]
    named = named_tensors(version, sizes, [torch.float32, torch.float32, torch.bfloat16, torch.int64, torch.float32])
    return [*named, ("lm_head.weight", named[0][1])]


def checksum(named) -> float:
    """Order-independent: a receiver yields a tied weight right after its source."""
    return float(sum(t.double().sum().item() * (i + 1) for i, (_, t) in enumerate(sorted(named, key=lambda x: x[0]))))


def unique_bytes(named) -> int:
    return sum(t.nbytes for t in {t.data_ptr(): t for _, t in named}.values())


def spawn_peer(port: int, member: str, mode: str) -> subprocess.Popen:
    """A peer process; with ``wait`` in ``mode`` it joins only after a line on its stdin (start-up overlaps)."""
    return subprocess.Popen(
        [sys.executable, __file__, str(port), member, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def peer_lines(proc: subprocess.Popen, timeout: float = 60) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert lines, f"peer printed nothing; rc={proc.returncode}\n{err[-3000:]}"
    return lines


class ThreadReceiver:
    """A receiver on a thread of this process: it joins at once and receives on demand."""

    def __init__(self, port: int, member: str, holds_version: int | None = None, **kw) -> None:
        self.rx = WeightReceiver(cfg(**kw), "127.0.0.1", port, member, holds_version=holds_version)
        self.results: list = []
        self._thread: threading.Thread | None = None

    def receive_async(self, load=None) -> None:
        def run() -> None:
            got: list = []
            try:
                stats = self.rx.receive(load or (lambda it: got.extend((n, t.clone()) for n, t in it)))
                self.results.append((stats.version, checksum(got)))
            except Exception as err:
                self.results.append(err)

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def join(self):
        assert self._thread is not None
        self._thread.join(30)
        return self.results[-1]


def test_delivery_dead_peer_and_rejoin() -> None:
    with WeightSender(cfg()) as sender:
        dying = spawn_peer(sender.port, "gen7.rank0", "die")
        back = spawn_peer(sender.port, "gen7.rank0", "wait,receive:1")  # the restart, started early
        good = ThreadReceiver(sender.port, "gen0.rank0")
        sender.wait_for_members(2, 60)
        assert good.rx.after_version == -1

        good.receive_async()
        start = time.monotonic()
        stats = sender.broadcast(1, weights(1))
        elapsed = time.monotonic() - start
        assert good.join() == (1, checksum(weights(1)))
        assert stats.delivered == ["gen0.rank0"] and list(stats.failed) == ["gen7.rank0"]
        assert elapsed < TIMEOUT_S, f"a dead peer must fail at once, took {elapsed:.1f} s: {stats.failed}"
        assert peer_lines(dying)[-1] == {"event": "dying"}
        assert stats.payload_bytes == unique_bytes(weights(1)) and stats.buckets > 4  # the tied weight went once
        assert sender.members == ["gen0.rank0"]

        # the restarted generator joins again and gets the next version, the learner never stopped
        back.stdin.write("go\n")
        back.stdin.flush()
        sender.wait_for_members(2, 60)
        good.receive_async()
        stats = sender.broadcast(2, weights(2))
        assert stats.delivered == ["gen0.rank0", "gen7.rank0"] and not stats.failed
        assert good.join() == (2, checksum(weights(2)))
        lines = peer_lines(back)
        assert lines[0] == {"event": "joined", "after_version": 1}
        assert lines[1] == {"event": "received", "version": 2, "checksum": checksum(weights(2))}
        good.rx.close()


def test_stuck_peer_fails_within_the_timeout_and_others_still_receive() -> None:
    with WeightSender(cfg()) as sender:
        stuck = ThreadReceiver(sender.port, "gen1.rank0")  # joined, never calls receive
        good = ThreadReceiver(sender.port, "gen2.rank0")
        good.receive_async()
        start = time.monotonic()
        stats = sender.broadcast(5, weights(5))
        elapsed = time.monotonic() - start
        assert stats.delivered == ["gen2.rank0"] and list(stats.failed) == ["gen1.rank0"]
        assert TIMEOUT_S * 0.9 < elapsed < 2 * TIMEOUT_S + 2, elapsed
        assert good.join() == (5, checksum(weights(5)))
        # the stuck worker's next receive fails at once (its group was torn down) and it can rejoin
        start = time.monotonic()
        with pytest.raises(WeightSyncError):
            stuck.rx.receive(lambda it: list(it))
        assert time.monotonic() - start < TIMEOUT_S
        good.rx.close()


def test_silent_sender_and_failed_load() -> None:
    with WeightSender(cfg(timeout_s=1.5)) as sender:
        rx = ThreadReceiver(sender.port, "gen3.rank0", timeout_s=1.5)
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="header"):
            rx.rx.receive(lambda it: list(it))  # nobody sends: a clear error at (twice) the timeout, no hang
        assert 2.5 < time.monotonic() - start < 6
        assert rx.rx.group is None

        rx = ThreadReceiver(sender.port, "gen3.rank0", timeout_s=1.5)  # rejoin replaces the broken member

        def bad_load(it):
            next(it)
            raise KeyError("no such parameter")

        rx.receive_async(bad_load)
        stats = sender.broadcast(1, weights(1))
        assert isinstance(rx.join(), KeyError)  # the worker's own error, after a clean ack
        assert list(stats.failed) == ["gen3.rank0"] and "did not load" in stats.failed["gen3.rank0"]


def test_staged_mode_and_versions_must_increase() -> None:
    with WeightSender(cfg()) as sender:
        rx = ThreadReceiver(sender.port, "gen4.rank0", stream=False)
        rx.receive_async()
        assert sender.broadcast(3, weights(3)).delivered == ["gen4.rank0"]
        assert rx.join() == (3, checksum(weights(3)))
        with pytest.raises(ValueError, match="increase"):
            sender.broadcast(3, weights(3))
        rx.rx.close()


def test_a_member_with_older_weights_is_caught_up_alone() -> None:
    """A restarted generator holds the base weights (version 0) while the learner is at 2: the learner sends it
    version 2 again, to it alone — it must not have to wait for version 3 (which may never come without it)."""
    with WeightSender(cfg()) as sender:
        current = ThreadReceiver(sender.port, "gen0.rank0")
        for v in (1, 2):
            current.receive_async()
            assert sender.broadcast(v, weights(v)).delivered == ["gen0.rank0"]
            assert current.join() == (v, checksum(weights(v)))
        assert sender.behind(2) == []
        restarted = ThreadReceiver(sender.port, "gen1.rank0", holds_version=0)
        sender.wait_for_members(2, 60)
        assert restarted.rx.after_version == 0  # so it accepts version 2 when announced
        assert sender.behind(2) == ["gen1.rank0"]
        restarted.receive_async()
        stats = sender.broadcast(2, weights(2), members=sender.behind(2))
        assert stats.delivered == ["gen1.rank0"] and not stats.failed
        assert restarted.join() == (2, checksum(weights(2)))
        assert sender.behind(2) == []
        with pytest.raises(ValueError, match="older"):
            sender.broadcast(1, weights(1), members=["gen1.rank0"])
        current.receive_async()  # the next full update reaches both
        restarted.receive_async()
        assert sender.broadcast(3, weights(3)).delivered == ["gen0.rank0", "gen1.rank0"]
        assert current.join() == restarted.join() == (3, checksum(weights(3)))
        current.rx.close()
        restarted.rx.close()


# ----------------------------------------------------------------------------------- NCCL (GPU machines)


@pytest.mark.gpu
def test_cuda_buckets_round_trip() -> None:
    named = [(n, t.cuda()) for n, t in weights(11)]
    entries = entries_of(named)
    source = iter(t for e, (_, t) in zip(entries, named, strict=True) if not e.alias_of)
    for b in plan_buckets(entries, 1 << 20):
        parts = [next(source) for _ in b.slots]
        flat = pack(b, parts, torch.empty(max(b.nbytes, 1 << 20), dtype=torch.uint8, device="cuda"))
        for (_, have), want in zip(unpack(b, flat), parts, strict=True):
            assert have.is_cuda and torch.equal(have, want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL refuses two ranks on one GPU ('invalid usage', "
                    "seen with NCCL 2.28.9 on an H100): needs two GPUs")
def test_nccl_delivery_and_dead_peer() -> None:
    peer = "cuda:1"
    with WeightSender(cfg(), device="cuda:0") as sender:
        assert sender.backend == "nccl"
        good = spawn_peer(sender.port, "gen0.rank0", f"receive:1,{peer}")
        dying = spawn_peer(sender.port, "gen7.rank0", f"die,{peer}")
        sender.wait_for_members(2, 120)
        named = [(n, t.to("cuda:0")) for n, t in weights(1)]
        start = time.monotonic()
        stats = sender.broadcast(1, named)
        assert time.monotonic() - start < 2 * TIMEOUT_S + 5
        assert stats.delivered == ["gen0.rank0"] and list(stats.failed) == ["gen7.rank0"], stats
        assert peer_lines(good)[-1] == {"event": "received", "version": 1, "checksum": checksum(weights(1))}
        peer_lines(dying)


# ------------------------------------------------------------------------------------------ peer script


def _peer(port: int, member: str, mode: str, timeout_s: float = TIMEOUT_S) -> None:
    """``die``: exit after the first tensor of an update; ``receive:N``: receive N updates, print checksums;
    ``wait,...``: read a line from stdin first; ``...,cuda:1``: the worker's device."""
    if mode.startswith("wait,"):
        sys.stdin.readline()
        mode = mode.removeprefix("wait,")
    mode, _, device = mode.partition(",")
    rx = WeightReceiver(cfg(timeout_s=timeout_s), "127.0.0.1", port, member, device or "cpu")
    print(json.dumps({"event": "joined", "after_version": rx.after_version}), flush=True)
    if mode == "die":

        def load(it):
            next(it)
            print(json.dumps({"event": "dying"}), flush=True)
            os._exit(3)

        rx.receive(load)
    for _ in range(int(mode.partition(":")[2] or 0)):
        got: list = []
        stats = rx.receive(lambda it, got=got: got.extend((n, t.cpu().clone()) for n, t in it))
        print(json.dumps({"event": "received", "version": stats.version, "checksum": checksum(got)}), flush=True)
    rx.close()


if __name__ == "__main__":
    _peer(int(sys.argv[1]), sys.argv[2], sys.argv[3], *map(float, sys.argv[4:]))


# ------------------------------------------------------------------------------------ the store's interface


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the LISTEN sockets on ``port``, from /proc/net/tcp and tcp6 (hex, as the kernel writes)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_the_weight_store_listens_only_on_the_configured_interface() -> None:
    sender = WeightSender(WeightSyncConfig(host="127.0.0.1", timeout_s=TIMEOUT_S))
    try:
        # 0100007F is 127.0.0.1 as /proc/net/tcp writes it; a wildcard bind would show 00000000 or an all-zero tcp6
        assert _listening_addresses(sender.port) == ["0100007F"]
    finally:
        sender.close()
