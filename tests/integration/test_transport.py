"""Transport between real processes over tcp loopback and ipc: handshake, groups, control, rejections,
CURVE accept/refuse, maximum message size, backpressure and bounded shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import trio
import zmq
import zmq.auth
from transport_peer import BAD_MESSAGES, make_group

from prorl_async.config import TransportConfig
from prorl_async.transport.messages import Heartbeat, Message, Ready, Stop, TrajectoryGroup, WeightsReady, decode
from prorl_async.transport.sockets import ControlPublisher, Rejections, Sender, Transport, receive_loop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PEER = Path(__file__).with_name("transport_peer.py")


def start_peer(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PEER), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen[str], timeout_s: float = 30) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # only the process this test started
        out, _ = proc.communicate()
        pytest.fail(f"peer did not exit within {timeout_s} s:\n{out}")
    return proc.returncode, out


class Learner:
    """The learner's side, in this test process: PULL groups through the trio bridge, XPUB control."""

    def __init__(self, cfg: TransportConfig) -> None:
        self.cfg = cfg
        self.rejections = Rejections("test learner")
        self.received: list[Message] = []

    async def serve(self, peers_args, until, task_status=trio.TASK_STATUS_IGNORED) -> list[tuple[int, str]]:
        """Start the peers with the bound endpoints, collect messages until ``until(received)``, send Stop."""
        with Transport(self.cfg) as transport:
            send_channel, recv_channel = trio.open_memory_channel(self.cfg.channel_size)
            async with trio.open_nursery() as nursery:
                groups_ep = await nursery.start(
                    partial(receive_loop, rejections=self.rejections),
                    transport,
                    zmq.PULL,
                    transport.endpoint("groups"),
                    send_channel,
                )
                control = ControlPublisher(transport, transport.endpoint("control"))
                control.publish(WeightsReady(version=3))
                await nursery.start(control.serve_loop)
                procs = [start_peer(*args(groups_ep, control.endpoint)) for args in peers_args]
                with trio.move_on_after(40):
                    async for msg in recv_channel:
                        self.received.append(msg)
                        if until(self.received):
                            break
                control.publish(Stop("test done"))
                results = [await trio.to_thread.run_sync(finish, p) for p in procs]
                nursery.cancel_scope.cancel()
        return results


@pytest.mark.parametrize("endpoint", ["tcp", "ipc"])
def test_generator_process_handshakes_sends_groups_and_stops(endpoint: str, tmp_path: Path) -> None:
    ipc_dir = str(tmp_path) if endpoint == "ipc" else ""
    learner = Learner(TransportConfig(ipc_dir=ipc_dir))
    count = 5

    def peer(groups_ep: str, control_ep: str) -> list[str]:
        assert groups_ep.startswith(f"{endpoint}://")
        assert endpoint == "ipc" or groups_ep.startswith("tcp://127.0.0.1:")  # loopback by default
        return ["generator", groups_ep, control_ep, "--count", str(count), "--bad", "--ipc-dir", ipc_dir]

    def done(received: list[Message]) -> bool:
        return any(isinstance(m, Heartbeat) for m in received) and len(learner.rejections.counts()) == len(BAD_MESSAGES)

    [(code, out)] = trio.run(learner.serve, [peer], done)
    assert code == 0, out
    # the handshake answered with the latest control message
    assert "WeightsReady(version=3, max_staleness=None)" in out
    assert learner.received[0] == Ready("gen-1")  # READY comes first on the groups socket
    groups = [m for m in learner.received if isinstance(m, TrajectoryGroup)]
    assert groups == [make_group(seq) for seq in range(count)]
    assert learner.rejections.counts() == {reason: 1 for _, reason in BAD_MESSAGES}  # counted, receiver went on


def test_curve_accepts_an_authorized_key_and_refuses_others(tmp_path: Path) -> None:
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    keys.mkdir()
    authorized.mkdir()
    for name in ("learner", "gen", "intruder"):
        zmq.auth.create_certificates(keys, name)
    (authorized / "gen.key").write_bytes((keys / "gen.key").read_bytes())
    learner = Learner(
        TransportConfig(
            curve_secret_key_file=str(keys / "learner.key_secret"), curve_authorized_keys_dir=str(authorized)
        )
    )
    server_public = str(keys / "learner.key")

    def with_keys(secret: str | None):
        def peer(groups_ep: str, control_ep: str) -> list[str]:
            curve = ["--curve", secret, server_public] if secret else []
            return ["generator", groups_ep, control_ep, "--count", "2", "--handshake-timeout-s", "3", *curve]

        return peer

    peers = [with_keys(str(keys / "gen.key_secret")), with_keys(str(keys / "intruder.key_secret")), with_keys(None)]
    results = trio.run(learner.serve, peers, lambda got: any(isinstance(m, Heartbeat) for m in got))
    (ok, ok_out), (intruder, intruder_out), (plain, plain_out) = results
    assert ok == 0, ok_out
    assert intruder == 3 and "refused" in intruder_out, intruder_out
    assert plain == 3 and "refused" in plain_out, plain_out
    assert [m for m in learner.received if isinstance(m, Ready)] == [Ready("gen-1")]  # only the authorized one
    assert len([m for m in learner.received if isinstance(m, TrajectoryGroup)]) == 2


def test_oversized_frame_is_refused_and_the_receiver_goes_on() -> None:
    cfg = TransportConfig(max_message_mb=0.01)  # 10 KiB
    rejections = Rejections("test receiver")

    async def main() -> list[Message]:
        with Transport(cfg) as transport:
            send_channel, recv_channel = trio.open_memory_channel(4)
            async with trio.open_nursery() as nursery:
                ep = await nursery.start(
                    partial(receive_loop, rejections=rejections), transport, zmq.PULL, "tcp://127.0.0.1:*", send_channel
                )
                big = transport.socket(zmq.PUSH, ep, bind=False)
                big.send_multipart([b"G", b"\0" * 100_000])  # ZeroMQ drops this peer before reading the frame
                await trio.sleep(0.5)
                small = Sender(transport, zmq.PUSH, ep)
                await trio.to_thread.run_sync(small.send, Stop("small"), 10)
                got = [await recv_channel.receive()]
                big.close(linger=0)
                small.close()
                nursery.cancel_scope.cancel()
        return got

    assert trio.run(main) == [Stop("small")]
    assert rejections.counts() == {}  # the big frame never reached the decoder (it would count as msgpack)


def test_bounded_channel_is_backpressure_and_nothing_is_lost() -> None:
    cfg = TransportConfig(groups_high_water_mark=1, channel_size=1)

    async def main() -> tuple[int, int]:
        with Transport(cfg) as transport:
            send_channel, recv_channel = trio.open_memory_channel(cfg.channel_size)
            async with trio.open_nursery() as nursery:
                ep = await nursery.start(receive_loop, transport, zmq.PULL, transport.endpoint("groups"), send_channel)
                sender = Sender(transport, zmq.PUSH, ep)
                sent = 0
                group = make_group(0, samples=16, tokens=8192)  # ~1.5 MB: the kernel's socket buffers fill fast

                def fill() -> None:
                    nonlocal sent
                    while True:
                        try:
                            sender.send(group, timeout_s=1.0)
                        except TimeoutError:
                            return
                        sent += 1

                await trio.to_thread.run_sync(fill)  # nobody reads: the sender must block, not buffer forever
                received = 0
                while received < sent:
                    with trio.fail_after(10):
                        await recv_channel.receive()
                    received += 1
                sender.close()
                nursery.cancel_scope.cancel()
        return sent, received

    sent, received = trio.run(main)
    assert 0 < sent < 50 and received == sent


def test_cancelling_the_receiver_ends_its_thread_promptly() -> None:
    async def main() -> float:
        with Transport(TransportConfig()) as transport:
            send_channel, _recv_channel = trio.open_memory_channel(1)
            async with trio.open_nursery() as nursery:
                await nursery.start(receive_loop, transport, zmq.PULL, transport.endpoint("groups"), send_channel)
                start = time.monotonic()
                nursery.cancel_scope.cancel()
            return time.monotonic() - start

    threads = threading.active_count()
    assert trio.run(main) < 1.0
    assert threading.active_count() <= threads + 1  # trio's idle worker thread cache may keep one


def test_sender_process_with_undelivered_data_exits_within_linger() -> None:
    with Transport(TransportConfig(groups_high_water_mark=1)) as transport:
        stalled = transport.socket(zmq.PULL, transport.endpoint("groups"), bind=True, groups=True)  # never reads
        proc = start_peer("stall", stalled.getsockopt_string(zmq.LAST_ENDPOINT), "--linger-ms", "200")
        start = time.monotonic()
        code, out = finish(proc, timeout_s=30)
        stalled.close(linger=0)
    assert code == 0, out
    assert "stalled after" in out
    closed_s = float(out.split("closed in ")[1].split()[0])
    assert closed_s < 1.5, out  # linger 200 ms bounds the close although messages are pending
    assert time.monotonic() - start < 30


def test_sender_works_from_asyncio() -> None:
    """Generators are asyncio processes (vLLM's AsyncLLM): the blocking sender runs in a worker thread."""
    with Transport(TransportConfig()) as transport:
        pull = transport.socket(zmq.PULL, "tcp://127.0.0.1:*", bind=True, groups=True)
        sender = Sender(transport, zmq.PUSH, pull.getsockopt_string(zmq.LAST_ENDPOINT))

        async def generator() -> None:
            await asyncio.gather(*(asyncio.to_thread(sender.send, make_group(seq), 10) for seq in range(3)))

        asyncio.run(generator())
        got = []
        while len(got) < 3 and pull.poll(10_000):
            got.append(decode(pull.recv_multipart()))
        assert sorted(g.seq for g in got) == [0, 1, 2] and got[0] == make_group(got[0].seq)
        sender.close()
        pull.close()
