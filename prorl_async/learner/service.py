"""The learner process: prompts out, groups in, trainer steps, weights out. One trio nursery, its loops.

    dispatch_loop ─► control XPUB ─► GroupRequest(generator, request id, prompt) ─► generators
    receive_loop (transport thread) ─► ingest_loop ─► WaitingReplayBuffer ─► train_loop ─► Learner.train_step
                                                                                   │
                           control XPUB ◄── WeightsReady(v) ◄──────────────────────┤
                           weight group ◄── WeightSender.broadcast(v) ◄────────────┘
    control.serve_loop answers new subscribers with the latest WeightsReady (READY handshake).

The service is the nursery, the routing of messages, the train loop and the checkpoint; the concerns live in
components, each with its invariants: :mod:`~prorl_async.learner.dispatch` (prompt order, admission, requests,
``WeightsReady``), :mod:`~prorl_async.learner.ingest` (every group accounted for),
:mod:`~prorl_async.learner.handoff` (the weight broadcast and catch-up), :mod:`~prorl_async.learner.validation`
(validation rounds: a baseline at start, then by steps or minutes), :mod:`~prorl_async.learner.staleness` (the
bound) and :mod:`~prorl_async.learner.records` (the ``step`` record). Components never reference the service: they
get callables and objects. Invariants of the whole:

- ``train_step`` and the broadcast run on worker threads (``trio.to_thread``) so that ingestion keeps
  draining the sockets while the learner computes: generation and training overlap (DESIGN.md section 4).
- ``_weights_lock`` is held by every trainer step with its weight handoff, by a catch-up broadcast and by the end of
  a run (final checkpoint, last validation round): the weights, the reset policy and the broadcasts never race.
- Every group that arrives is accounted for: admitted, dropped as ``unrequested`` (it answers no request in
  flight), or dropped with a reason (buffer counters; a group the learner cannot train on is ``untrainable``, never
  an exception in a step), and every step writes one ``step`` record to ``RUN_DIR/metrics.jsonl``. Messages the
  decoder refuses (malformed, empty, outside the model's vocabulary) are counted by reason (``messages_rejected``).
- One policy version per trainer step (batch), whatever ``learner.mini_batches`` is: staleness, admission and
  every ``*_every_steps`` setting count it.
- The bound endpoints are written to ``RUN_DIR/endpoints.json`` once listening: that is how the supervisor
  (and generators) find the learner.
- A checkpoint is the learner's files plus the buffered groups (with the *parked* one: received while the
  buffer was full, waiting for room — answered already, so its prompt is not also re-queued), the prompt order
  with the requests in flight re-queued, and the counters (``utils.run_dir``), snapshotted between two ingested
  messages and written under a temporary name. Its ``train_elapsed_s`` carries ``run.time_budget_s`` across
  resumes.
- The end of a run: training stops (after the step in progress, and the broadcast in flight), dispatch stops, the
  final checkpoint is written, the validation round in flight is waited for (ingestion then discards the groups
  that still arrive: the checkpoint, taken before, re-queues their prompts on resume), then ``Stop`` goes out.

Run as a process: ``python -m prorl_async.learner RUN_DIR [--resume CHECKPOINT_DIR]`` (reads
``RUN_DIR/config.toml``). With ``--world W > 1`` it is one rank of a learner of several
(:mod:`~prorl_async.learner.ranks`): rank 0 runs this service with a ``LeadingLearner`` (every collective it makes,
the other ranks make too), ranks >= 1 only follow.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import zmq

from prorl_async.learner.buffer import BufferStarved, ReplayBuffer, WaitingReplayBuffer
from prorl_async.learner.clock import TrainClock
from prorl_async.learner.dispatch import Dispatcher
from prorl_async.learner.handoff import WeightHandoff
from prorl_async.learner.ingest import GroupIntake
from prorl_async.learner.records import StepRecords, batch_summary, buffer_figures
from prorl_async.learner.staleness import AutoStaleness, StalenessController
from prorl_async.learner.validation import ValidationCoordinator
from prorl_async.monitor.metrics import MetricsLog
from prorl_async.monitor.wandb_sink import tracking_sinks
from prorl_async.transport.messages import (
    Heartbeat,
    Limits,
    Ready,
    RequestReturned,
    Status,
    Stop,
    TrajectoryGroup,
    ValidationAnswer,
)
from prorl_async.transport.sockets import Rejections
from prorl_async.utils.fs import write_atomic
from prorl_async.utils.run_dir import begin, commit, load_run_state, save_run_state

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.learner.ranks import LeadingLearner, RankSpec
    from prorl_async.learner.trainer import Learner

log = logging.getLogger("prorl_async.learner.service")

def load_learner(cfg: Config, run_dir: Path, resume_from: Path | None,
                 ranks: RankSpec | None = None) -> Learner | LeadingLearner:
    """A new learner, or the one checkpointed in ``resume_from``; as rank 0 of several, joined to the other ranks and
    leading them (:mod:`~prorl_async.learner.ranks`)."""
    from prorl_async.learner.trainer import Learner

    if ranks is None or ranks.world == 1:
        return Learner.resume_or_new(cfg, resume_from)
    from prorl_async.learner.ranks import LeadingLearner, join_ranks

    commands = join_ranks(cfg, run_dir, ranks)
    return LeadingLearner(Learner.resume_or_new(cfg, resume_from), commands)


class LearnerService:
    """Owns the learner, the replay buffer, the sockets and the weight sender of one run, and wires the components.

    The learner is the one passed in, or loaded by :meth:`serve` (from ``resume_from`` when given).

    Usage (inside trio)::

        service = LearnerService(cfg, run_dir)
        endpoints = await nursery.start(service.serve)   # returns once bound; endpoints.json written
    """

    def __init__(self, cfg: Config, run_dir: str | Path, learner: Learner | None = None,
                 resume_from: str | Path | None = None, ranks: RankSpec | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._learner = learner
        self.ranks = ranks  # rank 0 of several: the learner leads the others (prorl_async.learner.ranks)
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.buffer = WaitingReplayBuffer(
            ReplayBuffer(cfg.learner.batch_groups, cfg.buffer.ceiling,
                         cfg.buffer.min_reward_std if cfg.buffer.variance_filter else None)
        )
        self.metrics = MetricsLog(self.run_dir,
                                  sinks=tracking_sinks(cfg, self.run_dir, resume=self.resume_from is not None))
        self.generators: dict[str, dict[str, Any]] = {}  # each generator's latest reported figures, by source
        self.clock = TrainClock(cfg.run)
        self.rejections = Rejections("learner groups socket")  # undecodable messages, counted by reason
        self._weights_lock = trio.Lock()
        self._checkpointed = -1  # the version of the last checkpoint written
        self._interrupted = False
        self._control: Any = None  # the control publisher while serving
        b = cfg.buffer
        auto = AutoStaleness(b.auto_max_staleness, gap=b.auto_idle_gap, patience=b.auto_patience) if b.auto else None
        self.staleness = StalenessController(b.ceiling, auto, self.metrics)
        dispatch = self.dispatch = Dispatcher(cfg, self.metrics, bound=self.staleness.announced)
        self.records = StepRecords()
        self.intake = GroupIntake(self.buffer, dispatch, self.metrics, on_arrival=self.records.arrived)
        self.validation = ValidationCoordinator(
            cfg, self.metrics, weights_lock=self._weights_lock,
            observe=lambda version, reward: self.learner.observe_validation(reward, step=version),
            published_version=lambda: dispatch.published_version, republish=dispatch.republish,
            drain=self.intake.drain)  # a full buffer must not hold back the answers queued behind it
        self.handoff = WeightHandoff(cfg, self.metrics, self._weights_lock, dispatch.publish_weights)

    @property
    def learner(self) -> Learner | LeadingLearner:
        """The learner: passed to the constructor, or loaded by :meth:`serve`."""
        if self._learner is None:
            raise RuntimeError("no learner yet: serve() loads it")
        return self._learner

    def restore(self, directory: Path) -> None:
        """Buffered groups, sampler states and counters of the checkpoint in ``directory``."""
        buffer_state, prompts, service = load_run_state(directory)
        self.intake.restore(buffer_state, service, self.learner.vocab_size)
        self.dispatch.restore(prompts)
        self.clock.restore(service)
        self.staleness.restore(service)
        self.metrics.write("event", event="resumed", path=str(directory), version=self.learner.policy_version,
                           buffer_held=len(self.buffer.buffer), groups_arrived=self.intake.arrived)

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED) -> None:
        from prorl_async.learner.ranks import LeadingLearner
        from prorl_async.transport.sockets import ControlPublisher, Transport, receive_loop
        from prorl_async.transport.weights.sender import WeightSender

        if self._learner is None:
            self._learner = await trio.to_thread.run_sync(load_learner, self.cfg, self.run_dir, self.resume_from,
                                                          self.ranks)
        learner = self.learner
        if self.resume_from is not None:
            self.restore(self.resume_from)
        limits = Limits.from_config(self.cfg, vocab_size=learner.vocab_size)
        with Transport(self.cfg.transport, limits) as transport:
            control = self._control = ControlPublisher(transport, transport.endpoint("control"))
            self.dispatch.publish_weights(control, learner.policy_version)
            sender = WeightSender(self.cfg.weight_sync, device=learner.device)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(control.serve_loop)
                    send_channel, receive_channel = trio.open_memory_channel(self.cfg.transport.channel_size)
                    groups = await nursery.start(
                        partial(receive_loop, rejections=self.rejections),
                        transport, zmq.PULL, transport.endpoint("groups"), send_channel,
                    )
                    endpoints = {"groups": groups, "control": control.endpoint,
                                 "weight_sync": {"host": self.cfg.weight_sync.host, "port": sender.port}}
                    write_atomic(self.run_dir / "endpoints.json", json.dumps(endpoints, indent=2) + "\n")
                    self.metrics.write("event", event="learner_ready", version=learner.policy_version, **endpoints)
                    nursery.start_soon(self.ingest_loop, receive_channel)
                    nursery.start_soon(self.handoff.catch_up_loop, control, sender, learner)
                    nursery.start_soon(self.validation.validation_loop)
                    nursery.start_soon(self.dispatch.dispatch_loop, control, lambda: learner.policy_version)
                    self.validation.start(control, learner.policy_version)  # the baseline, beside the first batch
                    task_status.started(endpoints)
                    with trio.CancelScope() as train_scope:
                        nursery.start_soon(self.signals_loop, train_scope)
                        await self.wait_for_generators(sender)
                        await self.train_loop(control, sender)
                    self.dispatch.stop()
                    async with self._weights_lock:  # no catch-up broadcast from here on
                        await self.checkpoint()  # at the end and after SIGINT / SIGTERM
                        await self.validation.finish(self._interrupted)
                    # Stop goes out while control.serve_loop still owns the socket (it closes it on cancel);
                    # after a crash generators get no Stop: the supervisor stops them by pid.
                    control.publish(Stop(reason="learner finished"))
                    await trio.sleep(0.5)  # let the Stop leave before the socket closes
                    nursery.cancel_scope.cancel()
            finally:
                sender.close()
                if isinstance(learner, LeadingLearner):
                    learner.close()  # STOP to the other ranks

    async def ingest_loop(self, receive_channel: trio.MemoryReceiveChannel) -> None:
        """Route each message: groups into the buffer (counted by outcome), the rest to a component or metrics.

        Groups a checkpoint held parked (received while the buffer was full) go in first, in their order.
        """
        async with receive_channel:
            await self.intake.put_parked()
            async for msg in receive_channel:
                if isinstance(msg, TrajectoryGroup):
                    await self.intake.ingest(msg, self.learner.vocab_size)
                elif isinstance(msg, RequestReturned):
                    if not self.dispatch.on_returned(msg):
                        self.intake.count("unrequested_return")
                elif isinstance(msg, Ready):
                    if self.dispatch.on_ready(msg):
                        self.generators[msg.source] = {"joined_s": time.time()}
                        if self._control is not None:
                            self.validation.repeat(self._control)
                elif isinstance(msg, Heartbeat):
                    self.generators.setdefault(msg.source, {})["heartbeat_s"] = msg.time_s
                elif isinstance(msg, ValidationAnswer):
                    self.validation.on_answer(msg)
                elif isinstance(msg, Status):
                    self.generators.setdefault(msg.source, {}).update(msg.values)
                    self.metrics.write("generator", source=msg.source, **msg.values)

    async def wait_for_generators(self, sender: Any) -> None:
        """Start training once every generator holds the current weights, so all of them see every update."""
        want, timeout_s = self.cfg.generator.num_generators, self.cfg.generator.start_timeout_s
        try:
            members = await trio.to_thread.run_sync(sender.wait_for_members, want, timeout_s, abandon_on_cancel=True)
            self.metrics.write("event", event="generators_joined", members=members)
        except TimeoutError as err:
            self.metrics.write("event", event="generators_missing", detail=str(err))
            log.warning("%s; training starts without them", err)

    async def train_loop(self, control: Any, sender: Any) -> None:
        """Pull full batches, train, publish and broadcast the new weights; until max_steps or time budget.

        Overlapped broadcasts run in ``handoff.overlapping()``: this returns (or passes on an interrupt) only once
        the last one is done, so the final checkpoint and the Stop come after it.
        """
        cfg, learner, clock = self.cfg, self.learner, self.clock
        clock.start()
        async with self.handoff.overlapping(learner):
            while not clock.done(learner.policy_version):
                # An interrupt lands here even when the next batch is ready (a pull that need not wait does not
                # check for cancellation), and never between a pull and its step: no batch is lost.
                await trio.lowlevel.checkpoint_if_cancelled()
                t0 = time.monotonic()
                timeout_s = clock.pull_timeout_s(cfg.buffer.pull_timeout_s)
                try:
                    groups = await self.buffer.pull(cfg.learner.batch_groups, learner.policy_version, timeout_s)
                except BufferStarved as err:
                    if not clock.done(learner.policy_version):
                        self.metrics.write("event", event="buffer_starved", detail=str(err))
                        log.warning("%s", err)
                    continue
                waited = time.monotonic() - t0
                clock.idle_s += waited
                with trio.CancelScope(shield=True):  # an interrupt lands between steps, never inside one
                    await self._step(groups, waited, control, sender)

    async def _step(self, groups: list[TrajectoryGroup], waited: float, control: Any, sender: Any) -> None:
        """One trainer step (one policy version) on ``groups``, the weight handoff, the step record, a checkpoint.

        The batch is built on a worker thread; the step, the bound's revision and the handoff hold ``_weights_lock``
        (:mod:`~prorl_async.learner.handoff` says why a broadcast never reads weights a step may change).
        """
        from prorl_async.learner.batch import build_batch

        cfg, learner = self.cfg, self.learner
        summary = batch_summary(groups, learner.policy_version)
        batch = await trio.to_thread.run_sync(build_batch, groups)
        async with self._weights_lock:
            step = await trio.to_thread.run_sync(learner.train_step, batch)
            bound = self.staleness.revise(waited, step.step_time_s, self.generators)
            sync = await self.handoff.after_step(control, sender, learner)
        version = learner.policy_version
        record = self.records.step(
            step.as_dict(), summary, sync, version=version, wait_s=waited, max_staleness=bound,
            learner_idle_ratio=self.clock.idle_ratio(), groups_arrived=self.intake.arrived,
            messages_rejected=self.rejections.counts(), **buffer_figures(self.buffer.buffer),
            **self.dispatch.admission_figures(version))
        self.metrics.write("step", **record)
        self.validation.request(control, version)
        if cfg.run.checkpoint_every_steps and version % cfg.run.checkpoint_every_steps == 0:
            await self.checkpoint()

    async def signals_loop(self, train_scope: trio.CancelScope) -> None:
        """SIGINT / SIGTERM end training after the step in progress; ``serve`` then checkpoints and stops."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.metrics.write("event", event="interrupted", signal=int(signum),
                                   version=self.learner.policy_version)
                self._interrupted = True
                train_scope.cancel()
                return

    async def checkpoint(self) -> Path:
        """Learner + run state, snapshotted now (between two ingested messages), written on a worker thread.

        A version checkpointed already is not written again (the final checkpoint right after a periodic one):
        the earlier one is consistent, and a resume from it regenerates the groups that arrived since.
        """
        final = self.run_dir / "checkpoints" / f"step-{self.learner.policy_version:06d}"
        if self._checkpointed == self.learner.policy_version and final.is_dir():
            return final
        buffer_state, prompts = self.buffer.state(), self.dispatch.state()
        service = {**self.intake.state(), **self.clock.state(), **self.staleness.state()}

        def write() -> Path:
            tmp = begin(final)
            self.learner.save_checkpoint(tmp)
            save_run_state(tmp, buffer_state, prompts, service)
            return commit(tmp, final)

        path = await trio.to_thread.run_sync(write)
        self._checkpointed = self.learner.policy_version
        self.metrics.write("event", event="checkpoint", path=str(path), version=self.learner.policy_version,
                           buffer_held=len(buffer_state["groups"]))
        return path


def main(argv: list[str] | None = None) -> int:
    from prorl_async.config import load_config
    from prorl_async.supervisor.lifecycle import exit_with_parent

    p = argparse.ArgumentParser(prog="python -m prorl_async.learner")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT_DIR")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                   help="on top of RUN_DIR/config.toml, for this process only (a launcher's bind address)")
    p.add_argument("--rank", type=int, default=0, help="this process's rank among the learner's (0 runs the service)")
    p.add_argument("--world", type=int, default=1, help="the learner's ranks in all")
    p.add_argument("--rendezvous", default="", metavar="NONCE", help="this launch's nonce (several ranks)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run_dir)
    resume = Path(args.resume) if args.resume else None
    tag = f"learner-{args.rank}" if args.rank else "learner"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {tag} %(levelname)s %(message)s")
    exit_with_parent()
    cfg = load_config(run_dir / "config.toml", args.overrides)
    ranks = None
    if args.world > 1:
        from prorl_async.learner.ranks import RankSpec, follow

        ranks = RankSpec(args.rank, args.world, args.rendezvous)
        if args.rank > 0:
            return follow(cfg, run_dir, ranks, resume)
    service = LearnerService(cfg, run_dir, resume_from=resume, ranks=ranks)
    try:
        trio.run(service.serve)
    except KeyboardInterrupt:  # SIGINT while signals_loop does not listen: mostly while the model loads
        written = service._checkpointed >= 0
        log.info("interrupted (KeyboardInterrupt)%s", "" if written else ": stopped without a checkpoint")
        service.metrics.write("event", event="interrupted", signal=int(signal.SIGINT), checkpoint=written,
                              detail="KeyboardInterrupt")
        return 130
    finally:
        service.metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
