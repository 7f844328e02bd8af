"""The generator process: the learner's group requests in, sampled and scored groups out. Keeps no state a
restart must restore: the learner owns the prompt order and admission, and hands the requests a dead process held
to its successor.

Started by the supervisor as ``python -m prorl_async.generator --config RUN_DIR/config.toml --generator-id 0
--groups tcp://... --control tcp://... [--weight-sync HOST:PORT]``. Exit codes: 0 after ``Stop``, 2 for a
configuration problem (one line on stderr), 3 when the learner cannot be reached (handshake), 1 for anything else.

One asyncio loop:

- ``control_loop`` reads the learner's control socket: ``GroupRequest`` (for this generator: queued),
  ``WeightsReady`` (load the broadcast in flight, :meth:`Generator.update_weights`, the one place weights change;
  then abort the groups that version made too stale to use), ``Validate``, ``Stop``;
- ``dispatch_loop`` starts queued requests, oldest first, while fewer than ``generator.max_inflight_groups`` are
  in the engine and the loaded weights are at least the request's ``min_version``;
- one task per request (its problem at the request's curriculum ``level``;
  :func:`prorl_async.generator.rollout.sample`: render -> generate -> score), then the ``TrajectoryGroup``
  (``seq`` = the request id) goes out in a blocking send on a thread: backpressure from the learner holds the
  group, not the loop;
- validation (:mod:`prorl_async.generator.validate`) beside the training groups, in the same engine and pool;
- ``status_loop`` sends ``Heartbeat`` and ``Status`` every ``generator.heartbeat_s`` (the learner writes each Status
  as a ``generator`` record of ``metrics.jsonl``): cumulative counters, among them the pool's ``score_<status>`` and
  the user reward functions' zero scores by cause, ``reward_<cause>`` (:mod:`prorl_async.envs.rewards`), and
  ``reward_extras/<name>``: the mean of each extra score over the training samples sent since the last Status
  that went out (absent when none came).

Invariants: every request is answered exactly once on the groups socket, in this process's order: by its group,
or by ``RequestReturned`` (``stale``: aborted by a newer version; ``too_long``: the prompt does not fit the
context). A request a stop or a crash interrupts is not answered; the learner re-queues it (restart: the next
``Ready``; resume: the checkpoint holds it as in flight). Everything leaves on the one groups socket, so the
learner sees a generator's messages in the order they were sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from prorl_async.envs.rewards import ExtrasTotals, window_means
from prorl_async.generator import rollout
from prorl_async.generator.engine import Engine, Sampling, prepare_environment
from prorl_async.generator.validate import Validator
from prorl_async.transport.messages import (
    GroupRequest,
    Heartbeat,
    Limits,
    RequestReturned,
    Sample,
    Status,
    Stop,
    TrajectoryGroup,
    Validate,
    WeightsReady,
)

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.scoring_pool import ScoringPool

log = logging.getLogger("prorl_async.generator")

_CONTROL_POLL_S = 0.2
_SEND_POLL_S = 0.5


@dataclass
class _Running:
    request: GroupRequest
    start_version: int
    task: asyncio.Task[None]
    in_engine: bool = True


class Generator:
    """One generator process's state and loops; :func:`run_generator` builds and runs it."""

    def __init__(self, cfg: Config, generator_id: int, groups_ep: str, control_ep: str,
                 weight_sync: tuple[str, int] | None) -> None:
        from prorl_async.envs.tasks import TaskMix

        self.cfg, self.gid, self.source = cfg, generator_id, f"generator-{generator_id}"
        self.endpoints = (groups_ep, control_ep)
        self.weight_sync = weight_sync
        self.mix = TaskMix(cfg.tasks)
        self.sampling = Sampling.training(cfg)
        self.queue: deque[GroupRequest] = deque()  # received, not started
        self.running: dict[int, _Running] = {}  # request id -> its task
        self._seen: set[int] = set()  # request ids received: a repeated one is ignored
        self.learner_version = 0
        self.loaded_version = 0
        self.after_version = -1  # versions up to this one were broadcast before we joined the weight group
        self.weights_ok = True  # False after a partial update: sample nothing until a full one lands
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self.counters: dict[str, int] = dict.fromkeys(
            ("groups_sent", "samples_sent", "tokens_sent", "groups_aborted_stale", "prompts_too_long",
             "requests_received", "weight_updates", "weight_update_failures", "heartbeats_dropped"), 0)
        self.last_update_s = 0.0
        self.extras = ExtrasTotals()  # user reward functions' extra scores of the training samples sent
        self._extras_reported: dict[str, tuple[float, int]] = {}  # the totals the last sent Status reported
        self.started_at = time.monotonic()
        self._idle_s = 0.0  # time the engine held none of our requests (waiting for requests or weights)
        self._idle_since: float | None = time.monotonic()
        self.fatal: BaseException | None = None
        # One thread per blocking socket: a backpressured group send must not starve control reads.
        self._threads = {name: ThreadPoolExecutor(1, thread_name_prefix=f"gen-{name}")
                         for name in ("control", "send", "status")}

    async def _blocking(self, name: str, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads[name], fn, *args)

    # ------------------------------------------------------------------------------------------ run

    async def run(self) -> int:
        import zmq

        from prorl_async.envs.scoring_pool import ScoringPool
        from prorl_async.transport.sockets import Sender, Subscriber, Transport, handshake

        groups_ep, control_ep = self.endpoints
        with Transport(self.cfg.transport, Limits.from_config(self.cfg)) as transport:
            self.control = Subscriber(transport, control_ep)
            self.groups = Sender(transport, zmq.PUSH, groups_ep)
            first = await asyncio.to_thread(handshake, self.control, self.groups, self.source,
                                            self.cfg.transport.handshake_timeout_s)
            self.pool: ScoringPool = ScoringPool(
                self.cfg.generator.reward_workers, self.cfg.generator.reward_timeout_s,
                self.cfg.generator.reward_function,
                [self.mix.train_problem(i, 0).to_dict() for i in range(len(self.mix))])
            self.engine: Engine | None = None
            try:
                await self.pool.launch()  # the scoring workers import in their own processes while the engine starts
                self.engine = Engine.start(self.cfg, self.cfg.run.seed + 1000 * self.gid)  # blocks the loop (~15 s)
                await self.pool.start()
                await self.engine.set_version(0)
                self.validator = Validator(self.cfg, self.gid, self.mix, self.engine, self.pool, self._send_all,
                                           lambda: self.loaded_version if self.weights_ok else -1)
                if self.weight_sync is not None:
                    await self._join()
                await self._on_control(first)
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._terminate)
                loops = [asyncio.create_task(c) for c in (self.control_loop(), self.status_loop())]
                dispatch = asyncio.create_task(self.dispatch_loop())
                await self.stopping.wait()
                dispatch.cancel()
                await self._abort(list(self.running.values()), reason=None)
                await self.validator.cancel()
                await asyncio.gather(dispatch, *loops, return_exceptions=True)
                self._send_status(final=True)
            finally:
                await self.pool.close()
                if self.engine is not None:
                    self.engine.shutdown()
                    self.engine = None  # collected now, not at interpreter exit (its __del__ shuts down again)
                for pool in self._threads.values():
                    pool.shutdown(wait=True)
        if self.fatal is not None:
            log.error("%s: stopped by an error (the learner hands its requests out again): %r", self.source,
                      self.fatal)
            return 1
        return 0

    # -------------------------------------------------------------------------------------- control

    async def control_loop(self) -> None:
        """Ends after ``Stop`` (not cancelled: its socket read runs on a thread and must finish first)."""
        while not self.stopping.is_set():
            msg = await self._blocking("control", self.control.recv, _CONTROL_POLL_S)
            if msg is not None:
                await self._on_control(msg)

    async def _on_control(self, msg: Any) -> None:
        if isinstance(msg, GroupRequest):
            if msg.generator_id == self.gid and msg.request_id not in self._seen:
                self._seen.add(msg.request_id)
                self.queue.append(msg)
                self.counters["requests_received"] += 1
                self.changed.set()
        elif isinstance(msg, Stop):
            log.info("%s: stop (%s)", self.source, msg.reason)
            self.stopping.set()
        elif isinstance(msg, Validate):
            self.validator.request(msg)
        elif isinstance(msg, WeightsReady) and msg.version > self.learner_version:
            self.learner_version = msg.version
            if self.weight_sync is not None:
                while self.loaded_version < self.learner_version and self.learner_version > self.after_version:
                    if not await self.update_weights(self.learner_version):
                        break
            floor = self.learner_version - self.cfg.buffer.ceiling
            # Only groups still generating: a finished one is sent anyway (the learner drops it, counted).
            stale = [r for r in self.running.values() if r.start_version < floor and r.in_engine]
            self.counters["groups_aborted_stale"] += len(stale)
            await self._abort(stale, reason="stale")
            self.changed.set()
            self.validator.weights_changed()

    async def _join(self) -> None:
        host, port = self.weight_sync  # type: ignore[misc]
        assert self.engine is not None
        info = await self.engine.join(self.cfg.weight_sync.model_dump(), host, port, self.gid,
                                      self.loaded_version if self.weights_ok else -1)
        self.after_version = info["after_version"]
        log.info("%s: joined the weight group as %s (after version %d)", self.source, info["member"],
                 self.after_version)

    async def update_weights(self, announced: int) -> bool:
        """THE update hook: load the next broadcast into the running engine, in flight; True when loaded."""
        assert self.engine is not None
        start = time.perf_counter()
        try:
            self.loaded_version, self.weights_ok = await self.engine.load_weights(announced), True
            self.counters["weight_updates"] += 1
            return True
        except Exception as err:
            # The error crossed vLLM's RPC as text: whether buckets were already loaded is unknown. Streaming
            # loads as it receives, so assume a mix of old and new layers; staged updates leave weights intact.
            partial = self.cfg.weight_sync.stream
            self.counters["weight_update_failures"] += 1
            log.error("%s: weight update to version %d failed%s: %s", self.source, announced,
                      " mid-stream (weights are a mix: sampling stops until a full update)" if partial else "", err)
            if partial:
                self.weights_ok = False
                await self._abort(list(self.running.values()), reason="stale")
            await self._join()  # the group is gone after any failure: join again for the next version
            return False
        finally:
            self.last_update_s = time.perf_counter() - start

    async def _abort(self, groups: list[_Running], reason: str | None) -> None:
        """Cancel ``groups``; with a ``reason``, answer each with ``RequestReturned`` (None: stopping, the learner
        re-queues what is unanswered)."""
        for r in groups:
            r.task.cancel()
        await asyncio.gather(*(r.task for r in groups), return_exceptions=True)
        if reason is not None:
            for r in groups:
                await self._blocking("send", self._send, RequestReturned(self.source, self.gid, r.request.request_id,
                                                                         reason))
        if groups:
            log.info("%s: aborted %d groups (%s)", self.source, len(groups), reason or "stop")

    # ------------------------------------------------------------------------------------- dispatch

    def _next_startable(self) -> GroupRequest | None:
        in_engine = sum(r.in_engine for r in self.running.values())
        if (not self.queue or not self.weights_ok or in_engine >= self.cfg.generator.max_inflight_groups
                or self.queue[0].min_version > self.loaded_version):
            return None
        return self.queue.popleft()

    async def dispatch_loop(self) -> None:
        while True:
            while (request := self._next_startable()) is None:
                self.changed.clear()
                await self.changed.wait()
            task = asyncio.create_task(self._group(request, self.loaded_version))
            self.running[request.request_id] = _Running(request, self.loaded_version, task)
            self._engine_activity()
            await asyncio.sleep(0)  # let the group submit its request before the next one

    async def _group(self, request: GroupRequest, start_version: int) -> None:
        try:
            await self._sample_and_send(request, start_version)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the engine died or broke its contract: exit non-zero, the supervisor restarts us
            log.exception("%s: request %d failed", self.source, request.request_id)
            self.fatal = self.fatal or err
            self.stopping.set()
        finally:
            self.running.pop(request.request_id, None)
            self._engine_activity()
            self.changed.set()

    async def _sample_and_send(self, request: GroupRequest, start_version: int) -> None:
        assert self.engine is not None
        task = self.mix.train_problem(request.spec, request.index, level=request.level)
        prompt_ids = rollout.render(self.engine.tokenizer, task, self.cfg, self.sampling.max_tokens)
        if prompt_ids is None:
            self.counters["prompts_too_long"] += 1
            log.warning("%s: prompt %s is too long for model.max_model_len %d: returned", self.source, task.id,
                        self.cfg.model.max_model_len)
            await self._blocking("send", self._send, RequestReturned(self.source, self.gid, request.request_id,
                                                                     "too_long"))
            return

        def generated() -> None:
            self.running[request.request_id].in_engine = False
            self._engine_activity()
            self.changed.set()

        done = await rollout.sample(self.engine, self.pool, self.cfg, task, prompt_ids, self.sampling,
                                    f"g{self.gid}.r{request.request_id}", generated=generated)
        samples = [Sample(c.token_ids, c.logprobs, c.versions, c.finish_reason, r.reward, r.reason)
                   for c, r in zip(done.completions, done.scores, strict=True)]
        group = TrajectoryGroup(prompt_id=task.id, task=task.name, domain=task.domain,
                                prompt_token_ids=np.asarray(prompt_ids, dtype=np.int32), samples=samples,
                                generator_id=self.gid, seq=request.request_id)
        if await self._blocking("send", self._send, group):
            self.counters["groups_sent"] += 1
            self.counters["samples_sent"] += len(samples)
            self.counters["tokens_sent"] += group.num_tokens
            for r in done.scores:
                self.extras.add(r.extras)

    def _send(self, msg: Any) -> bool:
        """Blocking send on the groups socket that gives up only when the generator stops (backpressure waits)."""
        while not self.stopping.is_set():
            try:
                self.groups.send(msg, timeout_s=_SEND_POLL_S)
                return True
            except TimeoutError:
                continue
        return False

    async def _send_all(self, messages: list[Any]) -> bool:
        """Send ``messages`` in order on the groups socket; False if stopped first."""
        for msg in messages:
            if not await self._blocking("send", self._send, msg):
                return False
        return True

    # --------------------------------------------------------------------------------------- status

    async def status_loop(self) -> None:
        """Ends after ``Stop``; the final status is sent by :meth:`run` once every group is settled."""
        while not self.stopping.is_set():
            await self._blocking("status", self._send_status)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.generator.heartbeat_s)

    def _engine_activity(self) -> None:
        """Keep ``_idle_s``: time during which the engine held none of our requests."""
        busy = any(r.in_engine for r in self.running.values())
        now = time.monotonic()
        if busy and self._idle_since is not None:
            self._idle_s += now - self._idle_since
            self._idle_since = None
        elif not busy and self._idle_since is None:
            self._idle_since = now

    def status_values(self, extras: dict[str, tuple[float, int]] | None = None) -> dict[str, int | float]:
        """The figures of a Status. ``extras``: a snapshot of :attr:`extras`, reported as ``reward_extras/<name>``,
        the mean over the training samples sent since the last Status that went out."""
        now = time.monotonic()
        elapsed = max(now - self.started_at, 1e-9)
        idle_s = self._idle_s + (now - self._idle_since if self._idle_since is not None else 0.0)
        validator = getattr(self, "validator", None)
        return {
            **self.counters,
            **(validator.counters if validator is not None else {}),
            **{f"score_{k}": v for k, v in dict(self.pool.counters).items()},  # copied: the loop thread counts
            **dict(self.pool.reasons),  # reward_raised, reward_timeout, ...: user reward functions' zero scores
            **window_means(extras or {}, self._extras_reported),
            "score_seconds": round(self.pool.score_seconds, 3),
            "requests_in_flight": sum(r.in_engine for r in self.running.values()),
            "groups_in_flight": len(self.running),
            "requests_queued": len(self.queue),
            "policy_version": self.loaded_version,
            "learner_version": self.learner_version,
            "tokens_per_s": self.counters["tokens_sent"] / elapsed,
            "idle_ratio": round(idle_s / elapsed, 4),
            "idle_s": round(idle_s, 3),
            "weight_update_s": self.last_update_s,
        }

    def _send_status(self, final: bool = False) -> None:
        """Heartbeat + status on the groups socket; dropped (counted) when it is full: not worth waiting for."""
        extras = self.extras.snapshot()
        values = self.status_values(extras)
        if final:
            values["final"] = 1
        for msg in (Heartbeat(self.source, time.time()), Status(self.source, values)):
            try:
                self.groups.send(msg, timeout_s=0.1)
            except TimeoutError:
                self.counters["heartbeats_dropped"] += 1
            else:
                if isinstance(msg, Status):  # a dropped Status leaves its window to the next one
                    self._extras_reported = extras

    def _terminate(self) -> None:
        log.info("%s: SIGTERM: stopping (the learner hands unfinished requests out again)", self.source)
        self.stopping.set()


# ------------------------------------------------------------------------------------------ entry


def run_generator(cfg: Config, generator_id: int, groups_endpoint: str, control_endpoint: str, *,
                  weight_sync: tuple[str, int] | None = None) -> int:
    """Run one generator until ``Stop``; returns the exit code (module docstring)."""
    prepare_environment(cfg)
    # VLLM_CACHE_ROOT stays vLLM's default (or the user's): a fresh cache per run made vLLM inspect the model in
    # a subprocess that imports vllm again (engine start ~60 s instead of ~7 s on 2 loaded cores).
    return asyncio.run(Generator(cfg, generator_id, groups_endpoint, control_endpoint, weight_sync).run())


def main(argv: list[str] | None = None) -> int:
    from prorl_async.config import load_config
    from prorl_async.errors import UserError
    from prorl_async.supervisor.lifecycle import exit_with_parent
    from prorl_async.transport.sockets import TransportError

    p = argparse.ArgumentParser(prog="python -m prorl_async.generator", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the run's resolved config.toml")
    p.add_argument("--generator-id", type=int, required=True)
    p.add_argument("--groups", required=True, help="the learner's groups (PULL) endpoint")
    p.add_argument("--control", required=True, help="the learner's control (PUB) endpoint")
    p.add_argument("--weight-sync", default=None, metavar="HOST:PORT", help="the learner's weight-sync store")
    p.add_argument("--run-dir", default=None, help="the run directory (for the log's sake; nothing is read)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s gen{args.generator_id} %(levelname)s %(message)s")
    exit_with_parent()
    try:
        cfg = load_config(args.config, args.overrides)
        ws = None
        if args.weight_sync:
            host, _, port = args.weight_sync.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--weight-sync must be HOST:PORT (got {args.weight_sync!r})")
            ws = (host.strip("[]"), int(port))
        return run_generator(cfg, args.generator_id, args.groups, args.control, weight_sync=ws)
    except TransportError as err:
        print(f"generator {args.generator_id}: {err}", file=sys.stderr)
        return 3
    except (UserError, ValueError, OSError) as err:
        print(f"generator {args.generator_id}: {err}", file=sys.stderr)
        return 2
