"""A generator-side peer for the transport tests, run as its own process.

    python transport_peer.py generator GROUPS_EP CONTROL_EP --count N [--bad] [--ipc-dir D] [--curve SECRET SERVER]
    python transport_peer.py stall GROUPS_EP --linger-ms MS

``generator``: READY handshake, ``--count`` groups from :func:`make_group`, optionally a batch of bad
messages through a raw socket, a heartbeat, then waits for ``Stop`` on the control socket.
``stall``: fills a learner that does not read until a send times out, then closes: the exit must take
no longer than the linger. Exit codes: 0 done, 3 handshake refused/timed out, 4 no Stop received.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import msgpack
import numpy as np
import zmq

from prorl_async.config import TransportConfig
from prorl_async.transport.messages import Heartbeat, Sample, Stop, TrajectoryGroup
from prorl_async.transport.sockets import Sender, Subscriber, Transport, TransportError, handshake

# Bad messages the generator sends between its groups, and the reason each must be counted under.
BAD_MESSAGES: list[tuple[list[bytes], str]] = [
    ([b"G"], "frames"),
    ([b"Z", b"\x80"], "type"),
    ([b"G", b"\xc1garbage"], "msgpack"),
    ([b"W", msgpack.packb({"v": 999, "version": 1})], "schema"),
    ([b"H", msgpack.packb({"v": 1, "source": "x", "time_s": math.nan})], "nonfinite"),
    ([b"G", msgpack.packb({"v": 1})], "field"),
]


def make_group(seq: int, samples: int = 4, tokens: int = 32) -> TrajectoryGroup:
    """Deterministic from ``seq``: the test rebuilds the same group to compare."""
    rng = np.random.default_rng(seq)
    return TrajectoryGroup(
        prompt_id=f"prompt-{seq}",
        task="chain_sum",
        domain="logic",
        prompt_token_ids=rng.integers(0, 1000, 16),
        samples=[
            Sample(rng.integers(0, 1000, tokens), -rng.random(tokens), np.full(tokens, 3), "stop", float(i % 2), "ok")
            for i in range(samples)
        ],
        generator_id=1,
        seq=seq,
    )


def generator(args: argparse.Namespace) -> int:
    cfg = TransportConfig(
        ipc_dir=args.ipc_dir,
        curve_secret_key_file=args.curve[0] if args.curve else "",
        curve_server_public_key_file=args.curve[1] if args.curve else "",
    )
    with Transport(cfg) as transport:
        control = Subscriber(transport, args.control)
        groups = Sender(transport, zmq.PUSH, args.groups)
        try:
            first = handshake(control, groups, "gen-1", timeout_s=args.handshake_timeout_s)
        except TransportError as err:
            print(f"refused: {err}", flush=True)
            return 3
        print(f"first control message: {first}", flush=True)
        for seq in range(args.count):
            groups.send(make_group(seq), timeout_s=10)
            if args.bad and seq == 0:
                raw = transport.socket(zmq.PUSH, args.groups, bind=False)
                for frames, _ in BAD_MESSAGES:
                    raw.send_multipart(frames)
                # Its own pipe (no order with the groups socket is implied). Closing with the transport's 1 s
                # linger lost these frames once in CI (ipc, a loaded machine): the learner then waited for their
                # rejections and never sent Stop. Wait up to 10 s for them to be handed over.
                raw.close(linger=10_000)
        groups.send(Heartbeat("gen-1", time.time()), timeout_s=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if isinstance(control.recv(timeout_s=1), Stop):
                return 0
        return 4


def stall(args: argparse.Namespace) -> int:
    cfg = TransportConfig(linger_ms=args.linger_ms, groups_high_water_mark=1)
    transport = Transport(cfg)
    sender = Sender(transport, zmq.PUSH, args.groups)
    frames_sent = 0
    try:
        while True:
            sender.send(make_group(frames_sent, tokens=4096), timeout_s=0.5)
            frames_sent += 1
    except TimeoutError:
        pass
    print(f"stalled after {frames_sent} groups", flush=True)
    start = time.monotonic()
    sender.close()
    transport.close()
    print(f"closed in {time.monotonic() - start:.3f} s", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("generator", "stall"))
    parser.add_argument("groups")
    parser.add_argument("control", nargs="?", default="")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--bad", action="store_true")
    parser.add_argument("--ipc-dir", default="")
    parser.add_argument("--curve", nargs=2, metavar=("SECRET_KEY_FILE", "SERVER_PUBLIC_KEY_FILE"))
    parser.add_argument("--handshake-timeout-s", type=float, default=20.0)
    parser.add_argument("--linger-ms", type=int, default=200)
    args = parser.parse_args()
    return generator(args) if args.mode == "generator" else stall(args)


if __name__ == "__main__":
    sys.exit(main())
