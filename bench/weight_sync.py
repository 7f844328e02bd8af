"""Weight broadcast: bytes/s of a full update against a raw torch.distributed broadcast of the same size.

Per model (fp32 weights from transformers, named as ``Learner.weights()`` names them, tied head included), this
process plays the learner (``WeightSender``) and measures, in the same run and over the same group, against:

- ``vllm``: a generator process (``AsyncLLM`` on CPU + the weight-sync worker extension) that streams one long
  request all the time; an update is pause (keep) -> ``weight_sync_receive`` -> prefix-cache reset (running
  requests too) -> resume, as the generator process does it;
- ``plain``: a process that copies the received tensors into preallocated ones (the protocol without vLLM).

Per receiver, medians over ``--repeats`` after one warm-up:
- raw: ``WeightSender.raw_broadcast``: one flat buffer of the payload's size plus an 8-byte ack back, so that
  the time ends when the receiver has the bytes (the limit);
- update: ``WeightSender.broadcast``: header, manifest, buckets, and the worker's ack once loaded;
- pause (vllm): how long generation stops per update (pause -> resume, as the generator sees it) and the
  largest gap between two tokens of the streaming request across an update, against its median gap;
- engine floor (vllm): vLLM's own ``reload_weights`` of the model's checkpoint from memory, inside the worker
  (no network), and the part of it spent repacking linear layers into the CPU kernels' format
  (``dispatch_cpu_unquantized_gemm``): raw time / this floor is the most any receiver that loads through vLLM
  can reach on this machine (``ratio_bound_by_engine_reload``).

    python bench/weight_sync.py                            # tiny-random and smollm2-135m-instruct
    python bench/weight_sync.py --models tiny-random --json out.json
    python bench/weight_sync.py --device cuda --receivers plain   # NCCL: the learner's weights on a GPU

``--device cuda`` (a GPU machine; vLLM there is not needed) puts the sender's weights on ``cuda:0`` and the plain
receiver on ``cuda:1``: it needs two GPUs, NCCL refuses two ranks on one device ("invalid usage", seen with NCCL
2.28.9 on a one-GPU H100 machine). ``--models``
also takes a model folder (config + tokenizer; random weights suffice for timing).

``--json`` writes every row and, top level, ``ratio_to_raw_broadcast``: raw time / update time into vLLM (median
over rounds of the per-round ratio), the lowest over the models (goal >= 0.8); ``transfer_ratio_to_raw_broadcast``
is the same for the plain receiver; ``ratio_bound_by_engine_reload`` the lowest engine bound (see above).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prorl_async.generator.vllm_worker import WeightSyncWorkerExtension  # torch only, no vLLM

MODELS = ("tiny-random", "smollm2-135m-instruct")
BENCH_EXTENSION = "weight_sync.BenchWorkerExtension"  # this file, on the vLLM worker's path (Child's PYTHONPATH)
PREFIX = "@@ws "


def emit(event: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"event": event, **fields}), flush=True)


# ------------------------------------------------------------------------------------------- receivers


async def vllm_child(model_dir: str, host: str, port: int, cfg: dict) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
        worker_extension_cls=BENCH_EXTENSION, disable_log_stats=True))
    [info] = await engine.collective_rpc("weight_sync_join", args=(cfg, host, port, 0))
    arrivals: list[float] = []
    windows: list[tuple[float, float]] = []

    async def stream_loop() -> None:  # one long request at a time, for the whole run
        params = SamplingParams(temperature=1.0, max_tokens=960, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        for i in range(10**6):
            async for out in engine.generate(TokensPrompt(prompt_token_ids=list(range(10, 42))), params, f"s{i}"):
                now = time.perf_counter()
                arrivals.extend([now] * len(out.outputs[0].token_ids))

    streamer = asyncio.create_task(stream_loop())
    emit("joined", **info)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        if cmd["cmd"] == "raw":
            emit("receiving")
            await engine.collective_rpc("weight_sync_raw_broadcast")
            emit("done")
        elif cmd["cmd"] == "update":  # as the generator does it on WeightsReady
            t0 = time.perf_counter()
            await engine.pause_generation(mode="keep", clear_cache=False)
            emit("receiving")
            try:
                [got] = await engine.collective_rpc("weight_sync_receive", args=(cmd["version"],))
                await engine.reset_prefix_cache(reset_running_requests=True)
            finally:
                await engine.resume_generation()
            if cmd["live"]:
                windows.append((t0, time.perf_counter()))
            got.pop("inflight_tokens", None)
            emit("done", pause_s=time.perf_counter() - t0, **got)
        elif cmd["cmd"] == "floor":  # no stream interferes: the engine is paused
            await engine.pause_generation(mode="keep", clear_cache=False)
            try:
                [floor] = await engine.collective_rpc("bench_reload_floor", args=(cmd["repeats"],))
            finally:
                await engine.resume_generation()
            emit("floor", **floor)
        elif cmd["cmd"] == "gaps":  # token gaps across live updates, and in the second before each
            pairs = [(a, b) for a, b in itertools.pairwise(arrivals) if b > a]
            quiet = [b - a for a, b in pairs if any(w0 - 1.0 <= a and b < w0 for w0, _ in windows)]
            around = [max((b - a for a, b in pairs if a <= w1 and b >= w0), default=0.0) for w0, w1 in windows]
            emit("gaps", median_gap_s=statistics.median(quiet) if quiet else 0.0, update_gaps_s=around)
        elif cmd["cmd"] == "exit":
            break
    streamer.cancel()
    engine.shutdown()


class BenchWorkerExtension(WeightSyncWorkerExtension):
    """The weight-sync worker extension plus the bench's engine floor (imported by vLLM's worker by name)."""

    def bench_reload_floor(self, repeats: int) -> dict[str, Any]:
        """Median seconds of vLLM's ``reload_weights`` from the checkpoint in memory, and of its CPU repacking."""
        import torch
        from common import checkpoint_weights, median_seconds
        from vllm.model_executor.layers import utils as layer_utils

        weights = checkpoint_weights(Path(self.model_runner.model_config.model), torch.float32)  # type: ignore[attr-defined]
        packing = layer_utils.dispatch_cpu_unquantized_gemm
        packs: list[float] = []  # repacking seconds per reload, the warm-up's first

        def timed_packing(*a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            try:
                packing(*a, **kw)
            finally:
                packs[-1] += time.perf_counter() - t

        def reload() -> None:
            packs.append(0.0)
            self.reload_weights(weights_iterator=iter(list(weights.items())))  # type: ignore[attr-defined]

        layer_utils.dispatch_cpu_unquantized_gemm = timed_packing
        try:
            total = median_seconds(reload, repeats)
        finally:
            layer_utils.dispatch_cpu_unquantized_gemm = packing
        return {"engine_reload_s": total, "engine_repack_s": statistics.median(packs[1:]),
                "checkpoint_bytes": sum(t.numel() * t.element_size() for t in weights.values())}


def plain_child(host: str, port: int, cfg: dict, device: str = "cpu") -> None:
    import torch

    from prorl_async.config import WeightSyncConfig
    from prorl_async.transport.weights.receiver import WeightReceiver

    rx = WeightReceiver(WeightSyncConfig(**cfg), host, port, "plain.rank0", device)
    dst: dict[str, torch.Tensor] = {}

    def load(weights) -> None:  # what a model's load_weights does: copy into parameters
        for name, t in weights:
            if name not in dst:
                dst[name] = torch.empty_like(t)
            dst[name].copy_(t)

    emit("joined", after_version=rx.after_version)
    while line := sys.stdin.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "raw":
            emit("receiving")
            rx.raw_broadcast()
            emit("done")
        elif cmd["cmd"] == "update":
            emit("receiving")
            emit("done", **rx.receive(load, cmd["version"]).as_dict())
        elif cmd["cmd"] == "exit":
            break
    rx.close()


# ------------------------------------------------------------------------------------------- learner


class Child:
    def __init__(self, argv: list[str], log: Path) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(log.parent / "vllm-cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                           os.environ.get("PYTHONPATH")]))}
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.events.put(json.loads(line[len(PREFIX):]))
            else:
                self.log.write(line)
        self.events.put(None)

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 600) -> dict:
        while True:
            msg = self.events.get(timeout=timeout)
            if msg is None:
                raise RuntimeError(f"receiver exited waiting for {event!r}; see {self.log.name}")
            if msg["event"] == event:
                return msg

    def close(self) -> None:
        try:
            self.send(cmd="exit")
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()  # only the child this bench started
        self.log.close()


def measure(sender: Any, child: Child, named: list, repeats: int, settle_s: float, live: bool) -> dict[str, Any]:
    """Per round: a raw broadcast and an update, each started once the child waits in its receive (the ratio);
    with ``live``, also an update started right after the command, as a learner does after ``WeightsReady``
    (the pause). The first round warms buffers and caches and is not counted."""
    nbytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for _, t in named}.values())
    raw, update, worker, pauses = [], [], [], []
    version = 0
    for i in range(repeats + 1):
        child.send(cmd="raw")
        child.expect("receiving")
        time.sleep(settle_s)
        [t] = sender.raw_broadcast(nbytes, repeats=1).values()
        child.expect("done")
        version += 1
        child.send(cmd="update", version=version, live=False)
        child.expect("receiving")
        time.sleep(settle_s)
        stats = sender.broadcast(version, named)
        assert not stats.failed, stats.failed
        done = child.expect("done")
        if live:
            time.sleep(1.0)  # the stream flows undisturbed before the update (its median gap is the reference)
            version += 1
            child.send(cmd="update", version=version, live=True)
            assert not sender.broadcast(version, named).failed
            pause = child.expect("done")["pause_s"]
        if i:
            raw.append(t[0])
            update.append(stats.seconds)
            worker.append(done)
            if live:
                pauses.append(pause)
    med = statistics.median
    out = {"payload_bytes": stats.payload_bytes, "buckets": stats.buckets, "raw_s": med(raw), "update_s": med(update),
           "worker_update_s": med(w["seconds"] for w in worker),
           "worker_network_wait_s": med(w["bucket_wait_s"] for w in worker), "raw_all_s": raw, "update_all_s": update}
    out["raw_bytes_per_s"] = nbytes / out["raw_s"]
    out["update_bytes_per_s"] = stats.payload_bytes / out["update_s"]
    # per round, raw and update ran seconds apart: the median of their ratios is robust to the machine's load drifting
    out["ratio_to_raw_broadcast"] = med(r / u for r, u in zip(raw, update, strict=True))
    if pauses:
        out["pause_s"] = med(pauses)
    return out


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from prorl_async.config import WeightSyncConfig
    from prorl_async.models import resolve_model
    from prorl_async.transport.weights.sender import WeightSender

    model_dir = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    named = [(n, p.detach()) for n, p in model.named_parameters(remove_duplicate=False)]
    cfg = WeightSyncConfig(bucket_mb=args.bucket_mb, timeout_s=600)
    peer_device = "cuda:1" if args.device.startswith("cuda") else "cpu"
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                           "bucket_mb": args.bucket_mb}
    for kind in args.receivers.split(","):
        with WeightSender(cfg, device=args.device) as sender:
            row["backend"] = sender.backend
            where = ["127.0.0.1", str(sender.port), json.dumps(cfg.model_dump())]
            argv = [str(model_dir), *where] if kind == "vllm" else [*where, peer_device]
            child = Child(["--child", kind, *argv],
                          workdir / f"{name}-{kind}.log")
            try:
                child.expect("joined")
                row[kind] = measure(sender, child, named, args.repeats, args.settle_s, live=kind == "vllm")
                if kind == "vllm":
                    child.send(cmd="gaps")
                    gaps = child.expect("gaps")
                    row[kind]["median_token_gap_s"] = gaps["median_gap_s"]
                    row[kind]["update_token_gap_s"] = statistics.median(gaps["update_gaps_s"][1:] or [0.0])
                    child.send(cmd="floor", repeats=args.repeats)
                    floor = child.expect("floor")
                    floor.pop("event")
                    row[kind].update(floor, ratio_bound_by_engine_reload=row[kind]["raw_s"] / floor["engine_reload_s"])
            finally:
                child.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated built-in model names")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates and raw broadcasts per receiver")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="weight_sync.bucket_mb")
    parser.add_argument("--settle-s", type=float, default=0.3, help="wait after the receiver is ready")
    parser.add_argument("--device", default="cpu", help="the sender's weights: cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--receivers", default="vllm,plain", help="vllm (CPU only), plain, or both")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "vllm":
            asyncio.run(vllm_child(rest[0], rest[1], int(rest[2]), json.loads(rest[3])))
        else:
            plain_child(rest[0], int(rest[1]), json.loads(rest[2]), *rest[3:])
        return 0

    from common import describe, machine_info

    info = machine_info()
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="prorl-bench-ws-"))  # the receivers' logs stay here
    kinds = args.receivers.split(",")
    if not kinds or set(kinds) - {"vllm", "plain"}:
        parser.error(f"--receivers: vllm and/or plain, not {args.receivers!r}")
    if "vllm" in kinds and args.device != "cpu":
        parser.error("the vLLM receiver runs vLLM's CPU build: use --receivers plain with --device cuda")
    if args.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < 2:
            parser.error("--device cuda needs two GPUs: NCCL refuses two ranks (sender, receiver) on one device")
    for name in args.models.split(","):
        rows.append(bench_model(name, args, workdir))
    backend = rows[0]["backend"]
    print(f"weight broadcast ({backend}, bucket {args.bucket_mb:g} MiB), medians of {args.repeats}; {describe(info)}")
    print(f"{'model':<22} {'MB':>6} {'receiver':>8} {'raw ms':>7} {'update ms':>9} {'net wait':>8} {'raw GB/s':>8} "
          f"{'upd GB/s':>8} {'ratio':>5} {'pause ms':>8} {'token gap ms':>13}")
    for r in rows:
        for kind in kinds:
            m = r[kind]
            pause = f"{m['pause_s'] * 1e3:>8.1f}" if "pause_s" in m else f"{'':>8}"
            gap = (f"{m['update_token_gap_s'] * 1e3:.1f} ({m['median_token_gap_s'] * 1e3:.1f})"
                   if "update_token_gap_s" in m else "")
            print(f"{r['model']:<22} {m['payload_bytes'] / 1e6:>6.1f} {kind:>8} {m['raw_s'] * 1e3:>7.1f} "
                  f"{m['update_s'] * 1e3:>9.1f} {m['worker_network_wait_s'] * 1e3:>8.1f} "
                  f"{m['raw_bytes_per_s'] / 1e9:>8.2f} {m['update_bytes_per_s'] / 1e9:>8.2f} "
                  f"{m['ratio_to_raw_broadcast']:>5.2f} {pause} {gap:>13}")
    print("(raw: one flat buffer + 8-byte ack; update: manifest + buckets + ack once loaded, as the learner sees it;\n"
          " net wait: of the worker's update time, the part blocked on the network (the rest is loading); pause:\n"
          " pause -> resume around a live update; token gap: largest gap between two streamed tokens across a\n"
          " live update, with the median gap in the second before it in parentheses)")
    for r in rows:
        if "engine_reload_s" in r.get("vllm", {}):
            m = r["vllm"]
            print(f"{r['model']}: vLLM's reload_weights from memory (no network) {m['engine_reload_s'] * 1e3:.1f} ms, "
                  f"{m['engine_repack_s'] * 1e3:.1f} ms of it repacking for the CPU kernels -> the most a receiver "
                  f"loading through vLLM can reach here: {m['ratio_bound_by_engine_reload']:.2f} of the raw broadcast")
    lowest = {kind: min(r[kind]["ratio_to_raw_broadcast"] for r in rows) for kind in kinds}
    print("lowest ratio to the raw broadcast: " + ", ".join(f"{v:.2f} {k}" for k, v in lowest.items())
          + " (goal >= 0.8)")
    if args.json:
        # the headline is the update into vLLM where it ran, else the plain receiver's (a GPU run: NCCL, no vLLM)
        out = {"ratio_to_raw_broadcast": lowest.get("vllm", lowest.get("plain")),
               "transfer_ratio_to_raw_broadcast": lowest.get("plain"), "goal": 0.8, "machine": info,
               "ratio_bound_by_engine_reload": min((r["vllm"]["ratio_bound_by_engine_reload"] for r in rows
                                                    if "vllm" in r), default=None),
               "backend": backend, "device": args.device, "receivers": kinds, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
