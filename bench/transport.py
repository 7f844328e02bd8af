"""Throughput of the trajectory data plane: encode -> ZeroMQ -> decode between two processes.

The path measured is the one a run uses: a generator process ``Sender`` (PUSH, encode included) after the
READY handshake, and in the learner process ``receive_loop`` (PULL on a worker thread, ``decode`` with
full validation, the bounded trio channel) into a trio task that touches every group. Groups are built
before timing; the clock runs from the first group received to the last.

    python bench/transport.py                       # 16 samples x 1k and x 8k tokens, tcp loopback
    python bench/transport.py --endpoint ipc --json out.json

``--json`` writes every row and, top level, ``tokens_per_s``: the lowest over the sizes (goal >= 20M/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import trio
import zmq

from prorl_async.config import TransportConfig
from prorl_async.transport.messages import Sample, Status, Stop, TrajectoryGroup, WeightsReady, decode, encode
from prorl_async.transport.sockets import ControlPublisher, Sender, Subscriber, Transport, handshake, receive_loop

VOCAB = 151_936  # Qwen2's vocabulary: token ids use the full int32 range a real run has


def make_group(rng: np.random.Generator, samples: int, tokens: int, seq: int) -> TrajectoryGroup:
    """A realistic group: random ids and log-probs, one in-flight weight update in half the samples."""
    out = []
    for i in range(samples):
        versions = np.full(tokens, 7, dtype=np.int32)
        if i % 2:
            versions[tokens // 2 :] = 8
        out.append(
            Sample(
                token_ids=rng.integers(0, VOCAB, tokens, dtype=np.int32),
                logprobs=-rng.exponential(1.0, tokens).astype(np.float32),
                versions=versions,
                finish_reason="length",
                reward=float(i % 2),
                reward_reason="correct" if i % 2 else "wrong_answer",
            )
        )
    prompt = rng.integers(0, VOCAB, 256, dtype=np.int32)
    return TrajectoryGroup(f"chain_sum/{seq}", "chain_sum", "logic", prompt, out, generator_id=0, seq=seq)


def sender_main(
    cfg: TransportConfig, groups_ep: str, control_ep: str, samples: int, tokens: int, seconds: float
) -> None:
    rng = np.random.default_rng(0)
    pool = [make_group(rng, samples, tokens, seq) for seq in range(8)]
    with Transport(cfg) as transport:
        control, sender = Subscriber(transport, control_ep), Sender(transport, zmq.PUSH, groups_ep)
        handshake(control, sender, "bench-sender", timeout_s=30)
        deadline = time.monotonic() + seconds
        cpu0, i = time.process_time(), 0
        while time.monotonic() < deadline:
            sender.send(pool[i % len(pool)])  # encode + send: the generator's cost per group
            i += 1
        sender.send(Status("bench-sender", {"cpu_s": time.process_time() - cpu0, "groups": i}))
        sender.send(Stop("bench done"))
        control.close()
        sender.close()


async def receive(cfg: TransportConfig, samples: int, tokens: int, seconds: float) -> dict[str, float]:
    transport = Transport(cfg)
    send_channel, recv_channel = trio.open_memory_channel(cfg.channel_size)
    try:
        async with trio.open_nursery() as nursery:
            groups_ep = await nursery.start(
                receive_loop, transport, zmq.PULL, transport.endpoint("groups"), send_channel
            )
            control = ControlPublisher(transport, transport.endpoint("control"))
            control.publish(WeightsReady(7))
            nursery.start_soon(control.serve_loop)
            proc = mp.get_context("spawn").Process(
                target=sender_main, args=(cfg, groups_ep, control.endpoint, samples, tokens, seconds)
            )
            proc.start()
            n_groups, n_tokens, t_first, t_last, cpu_first, cpu_last = 0, 0, 0.0, 0.0, 0.0, 0.0
            sender_cpu: dict[str, float] = {}
            async for msg in recv_channel:
                if isinstance(msg, Stop):
                    break
                if isinstance(msg, Status):
                    sender_cpu = msg.values  # type: ignore[assignment]
                if not isinstance(msg, TrajectoryGroup):
                    continue
                now, cpu = time.perf_counter(), time.process_time()
                if n_groups == 0:
                    t_first, cpu_first = now, cpu
                else:  # the first group only starts the clock
                    n_tokens += msg.num_tokens
                n_groups += 1
                t_last, cpu_last = now, cpu
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(proc.join, 30)
    finally:
        transport.close()
    elapsed = t_last - t_first
    group_bytes = len(encode(make_group(np.random.default_rng(1), samples, tokens, 0))[1])
    return {
        "groups_per_s": (n_groups - 1) / elapsed,
        "sender_cpu_us_per_group": sender_cpu["cpu_s"] / sender_cpu["groups"] * 1e6,
        "receiver_cpu_us_per_group": (cpu_last - cpu_first) / (n_groups - 1) * 1e6,
        "receiver_core_tokens_per_s": n_tokens / (cpu_last - cpu_first),
        "tokens_per_s": n_tokens / elapsed,
        "mb_per_s": (n_groups - 1) * group_bytes / elapsed / 1e6,
        "groups": n_groups,
        "group_bytes": group_bytes,
    }


def codec_cost_us(samples: int, tokens: int) -> tuple[float, float]:
    """Best-of-5 microseconds to encode and to decode one group, in this process."""
    group = make_group(np.random.default_rng(2), samples, tokens, 0)
    frames = encode(group)
    enc = min(timeit.repeat(lambda: encode(group), number=50, repeat=5)) / 50
    dec = min(timeit.repeat(lambda: decode(frames), number=50, repeat=5)) / 50
    return enc * 1e6, dec * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="samples per group")
    parser.add_argument("--tokens", default="1024,8192", help="response tokens per sample, comma-separated sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="sending time per size")
    parser.add_argument("--endpoint", choices=("tcp", "ipc"), default="tcp", help="tcp loopback or ipc socket")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prorl-bench-") as ipc_dir:
        cfg = TransportConfig(ipc_dir=ipc_dir if args.endpoint == "ipc" else "")
        rows = []
        for tokens in (int(t) for t in args.tokens.split(",")):
            result = trio.run(receive, cfg, args.samples, tokens, args.seconds)
            enc_us, dec_us = codec_cost_us(args.samples, tokens)
            rows.append({"samples": args.samples, "tokens": tokens, **result, "encode_us": enc_us, "decode_us": dec_us})

    print(f"encode -> ZeroMQ ({args.endpoint}) -> decode, two processes, {args.seconds:g} s per size")
    print(
        f"{'group':>12} {'groups/s':>9} {'Mtokens/s':>10} {'MB/s':>6} {'encode us':>10} {'decode us':>10} "
        f"{'send CPU us':>12} {'recv CPU us':>12} {'Mtok/s/core':>12}"
    )
    for r in rows:
        print(
            f"{r['samples']:>4} x {r['tokens']:<5} {r['groups_per_s']:>9.0f} {r['tokens_per_s'] / 1e6:>10.1f} "
            f"{r['mb_per_s']:>6.0f} {r['encode_us']:>10.0f} {r['decode_us']:>10.0f} "
            f"{r['sender_cpu_us_per_group']:>12.0f} {r['receiver_cpu_us_per_group']:>12.0f} "
            f"{r['receiver_core_tokens_per_s'] / 1e6:>12.1f}"
        )
    print(
        "(CPU us: process CPU time per group of the sending and of the receiving process, all threads;\n"
        " Mtok/s/core: tokens per CPU-second of the receiving process, what it sustains with a core to itself)"
    )
    headline = min(r["tokens_per_s"] for r in rows)
    print(f"lowest: {headline / 1e6:.1f}M tokens/s (goal >= 20M)")
    if args.json:
        out = {"tokens_per_s": headline, "endpoint": args.endpoint, "goal_tokens_per_s": 20e6, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
