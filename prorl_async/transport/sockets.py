"""ZeroMQ sockets of the data plane: a configured socket factory, the thread-to-trio bridge, the learner's
control publisher and blocking senders for generators (asyncio or plain threads).

Topology (DESIGN.md section 2); the learner binds, generators connect:

    generator PUSH --TrajectoryGroup, Ready, Heartbeat, Status, ...--> learner PULL   (groups)
    learner XPUB   --WeightsReady, Stop-->                         generator SUB  (control)
    any PUB        --Status, Heartbeat-->                         collector SUB  (metrics)

Invariants:

- Endpoints are ``tcp://{host}:{port}`` (host: loopback unless configured; port 0: a free one, read back
  from the bound socket) or ``ipc://{ipc_dir}/{name}.sock``.
- Every socket has a bounded linger (closing never waits longer than ``linger_ms``) and ZeroMQ's
  ``MAXMSGSIZE``: a peer that sends a bigger frame is disconnected before the frame takes memory.
  High-water marks: ``groups_high_water_mark`` on the groups sockets, ``high_water_mark`` elsewhere.
- PUSH sockets set ``IMMEDIATE``: messages queue only on completed connections, so a refused or absent
  learner makes ``Sender.send`` block and time out instead of buffering data that goes nowhere.
- READY handshake: the learner's XPUB re-sends its latest control message to every new subscriber; a
  generator (``handshake``) waits for that first control message — learner reachable, keys accepted,
  subscription live — then sends ``Ready(source)`` as its first message on the groups socket.
  Control messages are idempotent (a generator may see the same ``WeightsReady`` twice).
- CURVE (when ``curve_secret_key_file`` is set, or the process was handed a run's keys in ``PRORL_CURVE_KEYS``,
  :class:`CurveKeys`): the binding side is the CURVE server and admits only the public keys in
  ``curve_authorized_keys_dir`` or the run's (ZAP); a client with another key, or none, is refused.
- A socket lives on one thread at a time. ``receive_loop`` hands a socket to a worker thread that
  decodes and passes messages to trio through a bounded memory channel; when trio stops reading, the
  thread blocks, ZeroMQ's queues fill up to the high-water marks and the senders block: the channel
  bound is the backpressure.
- Nothing is pickled. A message that fails ``messages.decode`` never raises out of a receiver: it is
  counted by reason in :class:`Rejections` and logged once per reason.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from prorl_async.errors import UserError
from prorl_async.transport.messages import DEFAULT_LIMITS, Limits, Message, MessageError, Ready, decode, encode

if TYPE_CHECKING:
    from prorl_async.config import TransportConfig

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often idle receive threads and the control loop look for cancellation
_SUBSCRIBE = b"\x01"  # first byte of an XPUB subscription event


class TransportError(UserError, RuntimeError):
    """A socket could not be set up or a peer was not reached (bad endpoint, keys, handshake timeout)."""


class Rejections:
    """Bad messages seen by one receiver, counted by ``MessageError.reason``; the first of each reason is logged."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, err: MessageError) -> None:
        with self._lock:
            self._counts[err.reason] += 1
            first = self._counts[err.reason] == 1
        if first:
            log.warning(
                "%s: rejected a message: %s (further '%s' rejections are only counted)", self.where, err, err.reason
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


CURVE_KEYS_ENV = "PRORL_CURVE_KEYS"


@dataclass(frozen=True)
class CurveKeys:
    """One process's CURVE keys for one run, held in memory (Z85 text): never in a file, never in a log.

    A launcher makes them with :func:`run_keys` and hands them to each process in its environment
    (``PRORL_CURVE_KEYS``, :meth:`to_env`), which only the process's own user can read. The learner (server)
    gets its key pair and the clients it admits; a generator (client) gets its key pair and the learner's public key.
    """

    public: bytes
    secret: bytes
    server_public: bytes = b""
    """A client's: the public key of the server it connects to."""
    authorized: tuple[bytes, ...] = ()
    """A server's: the public keys of the clients it admits."""

    def to_env(self) -> str:
        return json.dumps({"public": self.public.decode(), "secret": self.secret.decode(),
                           "server_public": self.server_public.decode(),
                           "authorized": [k.decode() for k in self.authorized]})

    @classmethod
    def from_env(cls, text: str) -> CurveKeys:
        try:
            raw = json.loads(text)
            keys = cls(raw["public"].encode(), raw["secret"].encode(), raw.get("server_public", "").encode(),
                       tuple(k.encode() for k in raw.get("authorized", [])))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TransportError(f"{CURVE_KEYS_ENV} does not hold a run's CURVE keys") from None
        if any(len(k) != 40 for k in (keys.public, keys.secret, *keys.authorized)):
            raise TransportError(f"{CURVE_KEYS_ENV}: a key is not 40 Z85 characters")
        return keys

    def __repr__(self) -> str:  # the secret never reaches a log line or a traceback
        return f"CurveKeys(public={self.public.decode()!r}, authorized={len(self.authorized)})"


def run_keys() -> tuple[CurveKeys, CurveKeys]:
    """Fresh keys for one run: (the learner's, the generators'). Each admits only the other."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return (CurveKeys(server_public, server_secret, authorized=(client_public,)),
            CurveKeys(client_public, client_secret, server_public=server_public))


class _Admit:
    """ZAP's credentials provider for a run's keys: admits exactly the authorized public keys."""

    def __init__(self, authorized: tuple[bytes, ...]) -> None:
        self.authorized = frozenset(authorized)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.authorized


class Transport:
    """One per process: the ZeroMQ context, this side's CURVE keys and ZAP handler, and the socket factory.

    Usage::

        with Transport(cfg.transport, Limits.from_config(cfg, vocab_size)) as transport:
            pub = ControlPublisher(transport, transport.endpoint("control"))   # learner
            sender = Sender(transport, zmq.PUSH, groups_endpoint)              # generator
    """

    def __init__(self, cfg: TransportConfig, limits: Limits = DEFAULT_LIMITS, keys: CurveKeys | None = None) -> None:
        """``keys``: a run's CURVE keys; by default those in ``PRORL_CURVE_KEYS``, else the configured key files."""
        self.cfg = cfg
        self.limits = limits
        self.context = zmq.Context()
        if keys is None and os.environ.get(CURVE_KEYS_ENV):
            keys = CurveKeys.from_env(os.environ[CURVE_KEYS_ENV])
        self._run_keys = keys
        if keys is not None:
            self._keys: tuple[bytes, bytes | None] | None = (keys.public, keys.secret)
        else:
            self._keys = _load_key_pair(cfg.curve_secret_key_file) if cfg.curve_secret_key_file else None
        self._auth: ThreadAuthenticator | None = None

    def endpoint(self, name: str) -> str:
        """Where the learner binds socket ``name`` (``groups``, ``control``, ``metrics``)."""
        if self.cfg.ipc_dir:
            return f"ipc://{Path(self.cfg.ipc_dir).resolve() / name}.sock"
        port = getattr(self.cfg, f"{name}_port")
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"tcp://{host}:{port or '*'}"

    def socket(self, kind: int, endpoint: str, *, bind: bool, groups: bool = False) -> zmq.Socket:
        """A configured socket, bound (CURVE server) or connected (CURVE client) to ``endpoint``."""
        cfg = self.cfg
        sock = self.context.socket(kind)
        sock.linger = cfg.linger_ms
        sock.setsockopt(zmq.MAXMSGSIZE, int(cfg.max_message_mb * (1 << 20)))
        sock.sndhwm = sock.rcvhwm = cfg.groups_high_water_mark if groups else cfg.high_water_mark
        if ":" in cfg.host or "[" in endpoint:
            sock.ipv6 = True
        if kind == zmq.PUSH:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        elif kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        elif kind == zmq.XPUB:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription, not only the first
        try:
            if self._keys is not None:
                self._secure(sock, server=bind)
            if bind:
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except (zmq.ZMQError, TransportError) as err:
            sock.close(linger=0)
            raise TransportError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {err}") from None
        return sock

    def _secure(self, sock: zmq.Socket, *, server: bool) -> None:
        public, secret = self._keys  # type: ignore[misc]
        sock.curve_publickey, sock.curve_secretkey = public, secret
        if server:
            self._start_authenticator()
            sock.curve_server = True
        elif self._run_keys is not None:
            if not self._run_keys.server_public:
                raise TransportError(f"{CURVE_KEYS_ENV} holds no server key: this process cannot connect with CURVE")
            sock.curve_serverkey = self._run_keys.server_public
        else:
            if not self.cfg.curve_server_public_key_file:
                raise TransportError("transport.curve_server_public_key_file is needed to connect with CURVE")
            sock.curve_serverkey = _load_key_pair(self.cfg.curve_server_public_key_file, public_only=True)[0]

    def _start_authenticator(self) -> None:
        if self._auth is not None:
            return
        if self._run_keys is not None:
            self._auth = ThreadAuthenticator(self.context)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_Admit(self._run_keys.authorized))
            return
        keys_dir = self.cfg.curve_authorized_keys_dir
        if not keys_dir or not Path(keys_dir).is_dir():
            raise TransportError(
                f"transport.curve_authorized_keys_dir must be a directory of public keys (got {keys_dir!r})"
            )
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=keys_dir)

    def close(self) -> None:
        """Close every socket still open (each waits at most its linger) and the ZAP handler."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.context.destroy(linger=self.cfg.linger_ms)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_key_pair(path: str, public_only: bool = False) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise TransportError(f"cannot read CURVE key file {path}: {err}") from None
    if secret is None and not public_only:
        raise TransportError(f"CURVE key file {path} holds no secret key (use the .key_secret file)")
    return public, secret


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint a socket was last bound or connected to, with a wildcard port resolved."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


# ------------------------------------------------------------------------------------------ trio side


async def receive_loop(
    transport: Transport,
    kind: int,
    endpoint: str,
    send_channel: trio.MemorySendChannel[Message],
    *,
    bind: bool = True,
    rejections: Rejections | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive on a PULL or SUB socket and send each valid message into ``send_channel``.

    Started with ``await nursery.start(receive_loop, ...)``, which returns the bound endpoint. The socket
    lives on a worker thread that blocks while the channel is full. Ends when cancelled, or when the
    channel's receiving side is closed; closes ``send_channel`` (fan-in: pass a clone).
    """
    sock = transport.socket(kind, endpoint, bind=bind, groups=kind == zmq.PULL)
    where = bound_endpoint(sock)
    rejections = rejections if rejections is not None else Rejections(f"receiver {where}")
    try:
        task_status.started(where)
        async with send_channel:
            await trio.to_thread.run_sync(_pump, sock, send_channel, transport.limits, rejections)
    finally:
        sock.close()  # the worker thread has ended: the socket is back on this thread


def _pump(
    sock: zmq.Socket, send_channel: trio.MemorySendChannel[Message], limits: Limits, rejections: Rejections
) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    batch_max = max(1, send_channel.statistics().max_buffer_size)  # math.inf for an unbounded channel
    while True:
        trio.from_thread.check_cancelled()
        if not poller.poll(_POLL_S * 1000):
            continue
        batch: list[Message] = []
        while len(batch) < batch_max:  # drain what is queued: one trio round trip per batch, not per message
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                batch.append(decode(frames, limits))
            except MessageError as err:
                rejections.add(err)
        if not batch:
            continue
        try:
            trio.from_thread.run(_send_all, send_channel, batch)  # blocks while the channel is full
        except trio.BrokenResourceError:
            return


async def _send_all(send_channel: trio.MemorySendChannel[Message], batch: list[Message]) -> None:
    for msg in batch:
        await send_channel.send(msg)


class ControlPublisher:
    """The learner's control socket (XPUB). ``publish`` never blocks; a new subscriber gets the latest message.

    Lives on the trio thread: call ``publish`` from trio tasks, and run :meth:`serve_loop` (it answers
    subscriptions) in the learner's nursery.

    Usage::

        control = ControlPublisher(transport, transport.endpoint("control"))
        control.publish(WeightsReady(version=0))   # before generators connect: the handshake's answer
        nursery.start_soon(control.serve_loop)
    """

    def __init__(self, transport: Transport, endpoint: str, *, bind: bool = True) -> None:
        self._sock = transport.socket(zmq.XPUB, endpoint, bind=bind)
        self.endpoint = bound_endpoint(self._sock)
        self._latest: list[bytes] | None = None
        self.subscriptions = 0

    def publish(self, msg: Message, *, latest: bool = True) -> None:
        """Send ``msg`` to every subscriber; ``latest``: it is also what a new subscriber is answered with (the
        handshake's WeightsReady: never a request meant for one generator)."""
        frames = encode(msg)
        if latest:
            self._latest = frames
        self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        # Never blocks: XPUB drops the message for a subscriber at its high-water mark (PUB semantics).
        self._sock.send_multipart(frames, flags=zmq.NOBLOCK)

    async def serve_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-send the latest control message to every new subscriber, until cancelled (then close)."""
        fd = self._sock.getsockopt(zmq.FD)
        task_status.started()
        try:
            while True:
                while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # reading EVENTS re-arms the FD
                    event = self._sock.recv(zmq.NOBLOCK)
                    if event[:1] == _SUBSCRIBE:
                        self.subscriptions += 1
                        if self._latest is not None:
                            self._send(self._latest)
                with trio.move_on_after(_POLL_S):  # the FD is edge-like: never trust it alone
                    await trio.lowlevel.wait_readable(fd)
        finally:
            self.close()

    def close(self) -> None:
        self._sock.close()


# ------------------------------------------------------------------------------------------ thread side


class Sender:
    """A blocking sender (PUSH to the learner's groups socket, PUB for metrics) that never pickles.

    ``send`` may be called from any thread (a lock serialises the socket); from asyncio use
    ``await asyncio.to_thread(sender.send, group)``. PUSH blocks while the learner is absent or at its
    high-water mark (backpressure); PUB never blocks (slow subscribers miss messages).
    """

    def __init__(self, transport: Transport, kind: int, endpoint: str, *, bind: bool = False) -> None:
        self._sock = transport.socket(kind, endpoint, bind=bind, groups=kind == zmq.PUSH)
        self.endpoint = bound_endpoint(self._sock)
        self._lock = threading.Lock()

    def send(self, msg: Message, timeout_s: float | None = None) -> None:
        """Send ``msg``; raises ``TimeoutError`` if it could not be queued within ``timeout_s`` (None: wait)."""
        frames = encode(msg)
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        with self._lock:
            if not self._sock.poll(timeout_ms, zmq.POLLOUT):
                raise TimeoutError(f"could not send to {self.endpoint} within {timeout_s:g} s")
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        with self._lock:
            self._sock.close()


class Subscriber:
    """A blocking SUB receiver (a generator's control socket); bad messages are counted in ``rejections``."""

    def __init__(self, transport: Transport, endpoint: str, *, bind: bool = False) -> None:
        self._sock = transport.socket(zmq.SUB, endpoint, bind=bind)
        self.endpoint = bound_endpoint(self._sock)
        self.limits = transport.limits
        self.rejections = Rejections(f"subscriber {self.endpoint}")
        self._lock = threading.Lock()

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or ``None`` when ``timeout_s`` passes without one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while True:
                left_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                if not self._sock.poll(left_ms, zmq.POLLIN):
                    return None
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                try:
                    return decode(frames, self.limits)
                except MessageError as err:
                    self.rejections.add(err)

    def close(self) -> None:
        with self._lock:
            self._sock.close()


def handshake(control: Subscriber, groups: Sender, source: str, timeout_s: float) -> Message:
    """Generator side of the READY handshake; returns the learner's first control message.

    Raises :class:`TransportError` when the learner does not answer within ``timeout_s``: it is not
    running, the endpoint is wrong, or CURVE refused this side's keys.
    """
    first = control.recv(timeout_s)
    if first is None:
        raise TransportError(
            f"no control message from the learner at {control.endpoint} within {timeout_s:g} s "
            "(not running, wrong endpoint, or CURVE keys refused)"
        )
    try:
        groups.send(Ready(source), timeout_s)
    except TimeoutError:
        raise TransportError(f"the learner's groups socket {groups.endpoint} did not accept {source}") from None
    return first
