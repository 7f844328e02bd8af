"""The learner process: groups in, trainer steps, weights out. One trio nursery, four loops.

    receive_loop (transport thread) ─► ingest_loop ─► WaitingReplayBuffer ─► train_loop ─► Learner.train_step
                                                                                   │
                           control PUB ◄── WeightsReady(v) ◄───────────────────────┤
                           weight group ◄── WeightSender.broadcast(v) ◄────────────┘
    control.serve_loop answers new subscribers with the latest control message (READY handshake).

Invariants:
- ``train_step`` and the broadcast run on worker threads (``trio.to_thread``) so that ingestion keeps
  draining the sockets while the learner computes: generation and training overlap (DESIGN.md section 4).
- ``WeightsReady(v)`` is published before ``broadcast(v)``: generators learn the version on the control
  socket and join the collective that the sender is about to start.
- Every group that arrives is accounted for: admitted, or dropped with a reason (buffer counters; a group the
  learner cannot train on is ``untrainable``, never an exception in a step), and every step writes one ``step``
  record to ``RUN_DIR/metrics.jsonl``. Messages the decoder refuses (malformed, empty, outside the model's
  vocabulary) are counted by reason (``messages_rejected``).
- One policy version per trainer step (batch), whatever ``learner.mini_batches`` is: staleness, admission and
  every ``*_every_steps`` setting count it.
- The bound endpoints are written to ``RUN_DIR/endpoints.json`` once listening: that is how the supervisor
  (and generators) find the learner. Before it, ``RUN_DIR/sampler-states.json`` (each generator's prompt
  position, corrected for the groups already received: ``run_state.SamplerLedger``) when there is one; it
  is kept current while the run goes, and a restarted generator starts from it.
- A generator that joins the weight group holding older weights than the learner's (restarted, or a resumed
  run) is caught up by ``catch_up_loop`` between steps, alone. The weights never change during a broadcast:
  the train step and every broadcast hold ``_weights_lock``.
- A checkpoint is the learner's files plus the buffered groups (with the *parked* one: received while the
  buffer was full, waiting for room — the ledger already counts it as received), the sampler states and the
  counters (``run_state``), snapshotted between two ingested messages and written under a temporary name.
  Its ``train_elapsed_s`` carries ``run.time_budget_s`` across resumes.
- Periodic validation (``eval.every_steps``; :mod:`prorl_async.eval.validation`): after a step whose version is a
  multiple of it, ``Validate(v, round)`` is published for the weights just broadcast (then the latest
  ``WeightsReady`` again, so that a new subscriber's handshake still answers with weights). The generators'
  answers arrive as ``Metrics`` parts on the groups socket; ``validation_loop`` writes one ``validation`` record
  when every shard is in, or after ``DEFAULT_TIMEOUT_S`` with what arrived, and feeds a complete round's mean
  reward to the reset policy (plateau trigger) at the version it measured. A generator that (re)joins while a
  round waits is asked again (the others ignore the repeat). Training never waits for validation, but
  for the end of a run: after the final checkpoint the learner waits (bounded by the same timeout, not after
  an interrupt) for the round in flight, discarding the groups that still arrive (the checkpoint, taken
  before, re-queues their prompts on resume), then stops the generators.

Run as a process: ``python -m prorl_async.learner RUN_DIR [--resume CHECKPOINT_DIR]`` (reads
``RUN_DIR/config.toml``).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import zmq

from prorl_async.eval.validation import RESULTS_KEY, ValidationRound, ValidationTracker, decode_part, validation_record
from prorl_async.learner.buffer import AutoStaleness, BufferStarved, ReplayBuffer, WaitingReplayBuffer
from prorl_async.monitor.metrics import MetricsLog
from prorl_async.transport.messages import (
    Heartbeat,
    Limits,
    Metrics,
    Ready,
    Stop,
    TrajectoryGroup,
    Validate,
    WeightsReady,
)
from prorl_async.transport.sockets import Rejections
from prorl_async.utils.run_dir import SamplerLedger, begin, commit, load_run_state, save_run_state, write_atomic

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.learner.trainer import Learner, TrainBatch

log = logging.getLogger("prorl_async.learner.trainer")

_VALIDATION_POLL_S = 0.5
_UNTRAINABLE_EVENTS = 10  # events written for untrainable groups; later ones are only counted


def groups_to_batch(groups: list[TrajectoryGroup]) -> TrainBatch:
    """The learner's plain-data batch of whole groups, in order (sample j of group g at g * n + j)."""
    from prorl_async.learner.trainer import TrainBatch, TrainSample

    if not groups:
        raise ValueError("no groups")
    n = len(groups[0].samples)
    samples = []
    for group in groups:
        if len(group.samples) != n:
            raise ValueError(f"group {group.prompt_id} has {len(group.samples)} samples, expected {n}")
        prompt = group.prompt_token_ids.tolist()
        for s in group.samples:
            samples.append(
                TrainSample(
                    prompt_ids=prompt,
                    response_ids=s.token_ids.tolist(),
                    behaviour_logprobs=s.logprobs.tolist(),
                    reward=float(s.reward),
                    policy_versions=s.versions.tolist(),
                )
            )
    return TrainBatch(samples=samples, group_size=n)


def untrainable(group: TrajectoryGroup, vocab_size: int) -> str | None:
    """Why the learner cannot train on ``group`` (one line), or None. The decoder enforces the same rules given the
    vocabulary; this is the last line for groups that reached the buffer another way (a checkpoint)."""
    if not len(group.prompt_token_ids):
        return "empty prompt"
    for i, s in enumerate(group.samples):
        if not len(s.token_ids):
            return f"sample {i}: empty response"
        if len(s.logprobs) != len(s.token_ids) or len(s.versions) != len(s.token_ids):
            return f"sample {i}: per-token fields of another length"
        if not math.isfinite(s.reward):
            return f"sample {i}: reward {s.reward} is not finite"
    ids = [group.prompt_token_ids, *(s.token_ids for s in group.samples)]
    if any(int(a.min()) < 0 or int(a.max()) >= vocab_size for a in ids):
        return f"a token id outside the model's vocabulary [0, {vocab_size})"
    return None


def batch_summary(groups: list[TrajectoryGroup], learner_version: int) -> dict[str, Any]:
    """Reward and staleness figures of one batch, per domain as well."""
    rewards = [s.reward for g in groups for s in g.samples]
    by_domain: dict[str, list[float]] = {}
    for g in groups:
        by_domain.setdefault(g.domain, []).extend(s.reward for s in g.samples)
    staleness = [learner_version - int(g.min_version) for g in groups]
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "reward_by_domain": {d: sum(v) / len(v) for d, v in by_domain.items()},
        "group_staleness_mean": sum(staleness) / len(staleness),
        "group_staleness_max": max(staleness),
        "response_tokens_mean": sum(lengths) / len(lengths),
        "samples": len(rewards),
        "prompt_ids": [g.prompt_id for g in groups],  # what was trained on: resume must not repeat any
    }


class LearnerService:
    """Owns the learner, the replay buffer, the sockets and the weight sender of one run.

    Usage (inside trio)::

        service = LearnerService(cfg, run_dir)
        endpoints = await nursery.start(service.serve)   # returns once bound; endpoints.json written
    """

    def __init__(self, cfg: Config, run_dir: str | Path, learner: Learner | None = None,
                 resume_from: str | Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._learner = learner
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.buffer = WaitingReplayBuffer(
            ReplayBuffer(cfg.learner.batch_groups, cfg.buffer.ceiling,
                         cfg.buffer.min_reward_std if cfg.buffer.variance_filter else None)
        )
        self.metrics = MetricsLog(self.run_dir)
        self.generators: dict[str, dict[str, Any]] = {}
        self.arrived = 0
        self.outcomes: dict[str, int] = {}
        self.idle_s = 0.0
        self.rejections = Rejections("learner groups socket")  # undecodable messages, counted by reason
        self._parked: list[TrajectoryGroup] = []  # restored from a checkpoint: put before anything new
        self._elapsed_before_s = 0.0  # training time of the run before this process (resume): run.time_budget_s
        self._train_start: float | None = None  # monotonic time training started, minus _elapsed_before_s
        self.samplers = SamplerLedger()
        self.samplers_path = self.run_dir / "sampler-states.json"
        self._weights_lock = trio.Lock()
        self._checkpointed = -1  # the version of the last checkpoint written
        self._arrived_rewards = [0.0, 0]  # reward sum and samples of every group received since the last step
        self.validations = ValidationTracker(cfg.generator.num_generators)
        self.validation_counts: dict[str, int] = {}  # answers by outcome (accepted, late, bad, ...)
        self._published_version = 0  # the latest WeightsReady: the weights generators hold or are receiving
        self._interrupted = False
        self._draining = False  # after the final checkpoint: groups are discarded, validation answers kept
        self._put_scope: trio.CancelScope | None = None
        self._control: Any = None  # the control publisher while serving
        # max_staleness = "auto": the bound announced with every WeightsReady, revised after each step from the
        # learner's wait and the generators' idle time (reported as cumulative idle_s) over the step's cycle.
        self.auto = (AutoStaleness(cfg.buffer.auto_max_staleness, gap=cfg.buffer.auto_idle_gap,
                                   patience=cfg.buffer.auto_patience) if cfg.buffer.auto else None)
        self._idle_mark: tuple[float, dict[str, float]] | None = None  # (monotonic time, idle_s per generator)

    @property
    def learner(self) -> Learner:
        if self._learner is None:
            from prorl_async.learner.trainer import Learner

            if self.resume_from is not None:
                self._learner = Learner.load_checkpoint(self.resume_from, self.cfg)
            else:
                self._learner = Learner(self.cfg)
        return self._learner

    def restore(self, directory: Path) -> None:
        """Buffered groups, sampler states and counters of the checkpoint in ``directory``."""
        buffer_state, samplers, service = load_run_state(directory)
        self._parked = self.buffer.restore(buffer_state)
        vocab = self.learner.vocab_size
        self.buffer.buffer.evict(lambda g: untrainable(g, vocab) is None, "untrainable")
        for group in [g for g in self._parked if untrainable(g, vocab) is not None]:
            self._parked.remove(group)
            self.buffer.buffer.drop("untrainable")
        self.samplers = SamplerLedger(samplers)
        self.arrived, self.idle_s = int(service["groups_arrived"]), float(service["learner_idle_s"])
        self._elapsed_before_s = float(service.get("train_elapsed_s", 0.0))  # absent in older checkpoints
        self.outcomes = {str(k): int(v) for k, v in service["outcomes"].items()}
        if self.auto is not None and isinstance(service.get("auto_staleness"), dict):
            self.auto.restore(service["auto_staleness"])
        self._write_samplers()
        self.metrics.write("event", event="resumed", path=str(directory), version=self.learner.policy_version,
                           buffer_held=len(self.buffer.buffer), groups_arrived=self.arrived)

    def _write_samplers(self) -> None:
        write_atomic(self.samplers_path, json.dumps(self.samplers.states(), indent=1) + "\n")

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED) -> None:
        from prorl_async.transport.sockets import ControlPublisher, Transport, receive_loop
        from prorl_async.transport.weights.sender import WeightSender

        learner = await trio.to_thread.run_sync(lambda: self.learner)
        if self.resume_from is not None:
            self.restore(self.resume_from)
        limits = Limits.from_config(self.cfg, vocab_size=learner.vocab_size)
        with Transport(self.cfg.transport, limits) as transport:
            control = self._control = ControlPublisher(transport, transport.endpoint("control"))
            self._publish_weights(control, learner.policy_version)
            sender = WeightSender(self.cfg.weight_sync, device=learner.device)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(control.serve_loop)
                    send_channel, receive_channel = trio.open_memory_channel(self.cfg.transport.channel_size)
                    groups = await nursery.start(
                        partial(receive_loop, rejections=self.rejections),
                        transport, zmq.PULL, transport.endpoint("groups"), send_channel,
                    )
                    endpoints = {
                        "groups": groups,
                        "control": control.endpoint,
                        "weight_sync": {"host": self.cfg.weight_sync.host, "port": sender.port},
                    }
                    (self.run_dir / "endpoints.json").write_text(json.dumps(endpoints, indent=2) + "\n")
                    self.metrics.write("event", event="learner_ready", version=learner.policy_version, **endpoints)
                    nursery.start_soon(self.ingest_loop, receive_channel)
                    nursery.start_soon(self.catch_up_loop, control, sender)
                    nursery.start_soon(self.validation_loop)
                    task_status.started(endpoints)
                    with trio.CancelScope() as train_scope:
                        nursery.start_soon(self.signals_loop, train_scope)
                        await self.wait_for_generators(sender)
                        await self.train_loop(control, sender)
                    async with self._weights_lock:  # no catch-up broadcast from here on
                        await self.checkpoint()  # at the end and after SIGINT / SIGTERM
                        await self.finish_validation()
                    # Stop goes out while control.serve_loop still owns the socket (it closes it on cancel);
                    # after a crash generators get no Stop: the supervisor stops them by pid.
                    control.publish(Stop(reason="learner finished"))
                    await trio.sleep(0.5)  # let the Stop leave before the socket closes
                    nursery.cancel_scope.cancel()
            finally:
                sender.close()

    async def ingest_loop(self, receive_channel: trio.MemoryReceiveChannel) -> None:
        """Route each message: groups into the buffer (counted by outcome), the rest into metrics.

        Groups a checkpoint held parked (received while the buffer was full) go in first, in their order.
        """
        async with receive_channel:
            while self._parked:
                await self._put(self._parked.pop(0))
            async for msg in receive_channel:
                if isinstance(msg, TrajectoryGroup):
                    await self._ingest_group(msg)
                elif isinstance(msg, Ready):
                    self.generators[msg.source] = {"joined_s": time.time()}
                    self.metrics.write("event", event="generator_ready", source=msg.source)
                    self._repeat_validation()
                elif isinstance(msg, Heartbeat):
                    self.generators.setdefault(msg.source, {})["heartbeat_s"] = msg.time_s
                elif isinstance(msg, Metrics) and RESULTS_KEY in msg.values:
                    self._on_validation_part(msg)
                elif isinstance(msg, Metrics):
                    self.generators.setdefault(msg.source, {}).update(msg.values)
                    self.metrics.write("generator", source=msg.source, **msg.values)
                    self._on_sampler_state(msg)

    async def _ingest_group(self, msg: TrajectoryGroup) -> None:
        if self._draining:  # after the final checkpoint, which re-queues this group's prompt on resume
            self.outcomes["after_final_checkpoint"] = self.outcomes.get("after_final_checkpoint", 0) + 1
            return
        self.arrived += 1
        rewards = [x.reward for x in msg.samples]
        self._arrived_rewards[0] += sum(rewards)
        self._arrived_rewards[1] += len(rewards)
        if self.samplers.on_group(msg.generator_id, msg.seq):
            self._write_samplers()
        problem = untrainable(msg, self.learner.vocab_size)
        if problem is not None:  # counted, logged once per reason; the run goes on
            self._count(self.buffer.buffer.drop("untrainable"))
            self._log_untrainable(msg, problem)
            return
        await self._put(msg)

    async def _put(self, msg: TrajectoryGroup) -> None:
        """Into the buffer, waiting for room; while it waits, a checkpoint holds ``msg`` as the parked group."""
        outcome: str = "after_final_checkpoint"
        # Cancelled when draining starts: a full buffer must not hold the validation answers queued behind it.
        with trio.CancelScope() as self._put_scope:
            outcome = await self.buffer.put(msg)
        self._put_scope = None
        self._count(outcome)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _log_untrainable(self, group: TrajectoryGroup, problem: str) -> None:
        """The first few as events (a hostile or broken peer must not flood the log); all are counted."""
        seen = self.outcomes.get("untrainable", 0)
        if seen <= _UNTRAINABLE_EVENTS:
            log.warning("dropped an untrainable group %s from generator %d: %s", group.prompt_id[:80],
                        group.generator_id, problem)
            self.metrics.write("event", event="untrainable_group", prompt_id=group.prompt_id[:200],
                               generator_id=group.generator_id, detail=problem)

    def _on_validation_part(self, msg: Metrics) -> None:
        """File one part of a generator's validation answer; a malformed one is counted and logged, nothing else."""
        try:
            part = decode_part(msg.values[RESULTS_KEY])
        except ValueError as err:
            outcome = "bad"
            self.metrics.write("event", event="bad_validation_results", source=msg.source, detail=str(err)[:300])
        else:
            outcome = self.validations.add(part)
            if outcome != "accepted":
                self.metrics.write("event", event=f"validation_results_{outcome}", source=msg.source,
                                   version=part.version, round=part.round, part=part.part)
        self.validation_counts[outcome] = self.validation_counts.get(outcome, 0) + 1

    def _publish_weights(self, control: Any, version: int) -> None:
        control.publish(WeightsReady(version=version, max_staleness=self.auto.bound if self.auto else None))
        self._published_version = version

    def _request_validation(self, control: Any) -> None:
        """After a step: ask the generators to validate the weights just published, every ``eval.every_steps``."""
        every, version = self.cfg.eval.every_steps, self.learner.policy_version
        if not every or version % every or not self.cfg.tasks.validation_size:
            return
        r = self.validations.request(self._published_version, version, time.monotonic())
        if r is None:
            busy = self.validations.pending
            self.metrics.write("event", event="validation_skipped", version=version,
                               detail=f"round {busy.round} (version {busy.version}) is still running" if busy else "")
            return
        control.publish(Validate(version=r.version, round=r.round))
        # Restore the latest control message to a WeightsReady: a generator that subscribes now (restarted) is
        # answered with weights, as the handshake expects; the others see a repeat and ignore it.
        self._publish_weights(control, self._published_version)
        self.metrics.write("event", event="validation_requested", version=r.version, round=r.round, step=version)

    def _repeat_validation(self) -> None:
        """A generator (re)joined while a round waits: ask again, or its shard would only end in the timeout.

        Generators that already answered ignore the repeat (each ``(version, round)`` is answered once).
        """
        r = self.validations.pending
        if r is None or r.complete or self._control is None:
            return
        self._control.publish(Validate(version=r.version, round=r.round))
        self._publish_weights(self._control, self._published_version)

    async def validation_loop(self) -> None:
        """Write the validation round once complete or timed out (never blocks ingestion or training)."""
        while True:
            await trio.sleep(_VALIDATION_POLL_S)
            for r, reason in self.validations.due(time.monotonic()):
                await self._write_validation(r, reason)

    async def finish_validation(self) -> None:
        """At the end of training: wait for the round in flight (not after an interrupt), then write it."""
        if self.validations.pending is None:
            return
        self._draining = True
        if self._put_scope is not None:
            self._put_scope.cancel()
        deadline = self.validations.pending.requested_s + self.validations.timeout_s
        while not self._interrupted and time.monotonic() < deadline and self.validations.pending is not None:
            if self.validations.pending.complete:
                break
            await trio.sleep(0.1)
        for r, reason in self.validations.due(time.monotonic(), force="interrupted" if self._interrupted else "end"):
            await self._write_validation(r, reason, locked=True)

    async def _write_validation(self, r: ValidationRound, reason: str, locked: bool = False) -> None:
        e = self.cfg.eval
        record = validation_record(r, e.k, e.correct_threshold, time.monotonic(), reason)
        record["answers"] = dict(self.validation_counts)
        # Only a complete round feeds the plateau trigger: a partial one measures another set of prompts.
        fed = record["complete"] and record.get("prompts", 0) > 0
        record["reset_signal"] = "mean_reward" if fed else ""
        self.metrics.write("validation", **record)  # before any await: a cancelled caller still leaves the record
        log.info("validation of version %d (%s): %s", r.version, reason,
                 "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("pass_at_")) or "no prompts")
        if not fed:
            return
        # Measured with the weights of r.version (the reset policy compares steps); the policy decides at the end of
        # a step, so it never changes while train_step runs.
        if locked:
            self.learner.reset_policy.observe_validation(step=r.version, reward=record["mean_reward"])
        else:
            async with self._weights_lock:
                self.learner.reset_policy.observe_validation(step=r.version, reward=record["mean_reward"])

    def _on_sampler_state(self, msg: Metrics) -> None:
        state = msg.values.get("sampler_state")
        if not isinstance(state, str):
            return
        try:
            seqs, next_seq = msg.values.get("sampler_inflight_seqs"), msg.values.get("sampler_next_seq", 0)
            self.samplers.on_status(msg.source, state, seqs if isinstance(seqs, str) else None, int(next_seq))
        except (ValueError, TypeError) as err:  # a bad report costs that generator's exact restart, nothing else
            self.metrics.write("event", event="bad_sampler_state", source=msg.source, detail=str(err)[:200])
            return
        self._write_samplers()

    def _catch_up(self, sender: Any, version: int, members: list[str]) -> Any:
        return sender.broadcast(version, self.learner.weights(), members=members)

    async def catch_up_loop(self, control: Any, sender: Any) -> None:
        """Send the current weights to members that joined holding older ones (restarted generators, resume)."""
        while True:
            await trio.sleep(0.5)
            version = self.learner.policy_version
            if not sender.behind(version) or self._weights_lock.locked():
                continue
            async with self._weights_lock:
                behind = sender.behind(version)
                if not behind:
                    continue
                self._publish_weights(control, version)
                stats = await trio.to_thread.run_sync(self._catch_up, sender, version, behind)
                self.metrics.write("event", event="weights_catch_up", version=version, members=behind,
                                   delivered=stats.delivered, failed=stats.failed, seconds=stats.seconds)

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
        """Pull full batches, train, publish and broadcast the new weights; until max_steps or time budget."""
        cfg, learner = self.cfg, self.learner
        start = self._train_start = time.monotonic() - self._elapsed_before_s  # the budget spans resumes
        while not self._done(start):
            t0 = time.monotonic()
            timeout_s = cfg.buffer.pull_timeout_s
            if cfg.run.time_budget_s:  # the budget also ends a wait for groups, not only a step
                timeout_s = max(0.01, min(timeout_s, start + cfg.run.time_budget_s - t0))
            try:
                groups = await self.buffer.pull(cfg.learner.batch_groups, learner.policy_version, timeout_s)
            except BufferStarved as err:
                if not self._done(start):
                    self.metrics.write("event", event="buffer_starved", detail=str(err))
                    log.warning("%s", err)
                continue
            waited = time.monotonic() - t0
            self.idle_s += waited
            with trio.CancelScope(shield=True):  # an interrupt lands between steps, never inside one
                await self._step(groups, waited, start, control, sender)

    async def _step(self, groups: list[TrajectoryGroup], waited: float, start: float, control: Any,
                    sender: Any) -> None:
        """One trainer step (one policy version) on ``groups``, the broadcast, the step record, a checkpoint."""
        cfg, learner = self.cfg, self.learner
        summary = batch_summary(groups, learner.policy_version)
        batch = groups_to_batch(groups)
        sync: dict[str, Any] = {}
        async with self._weights_lock:
            step = await trio.to_thread.run_sync(learner.train_step, batch)
            bound = self._revise_bound(waited, step.step_time_s)
            if learner.policy_version % cfg.weight_sync.sync_every_steps == 0:
                self._publish_weights(control, learner.policy_version)
                stats = await trio.to_thread.run_sync(sender.broadcast, learner.policy_version, learner.weights())
                sync = {"sync_s": stats.seconds, "sync_bytes": stats.payload_bytes,
                        "sync_delivered": len(stats.delivered), "sync_failed": stats.failed}
        elapsed = time.monotonic() - start
        record = {**step.as_dict(), **summary, **sync}  # the batch summary's figures win over duplicates
        record.update(version=learner.policy_version, wait_s=waited, max_staleness=bound,
                      learner_idle_ratio=self.idle_s / max(elapsed, 1e-9),
                      groups_arrived=self.arrived, buffer_held=len(self.buffer.buffer),
                      buffer_counters=self.buffer.buffer.counters, messages_rejected=self.rejections.counts(),
                      buffer_staleness_hist={str(k): v for k, v in self.buffer.buffer.staleness_histogram().items()})
        # The batch's reward_mean is over the groups that passed the variance filter; this one is over everything
        # the generators produced since the last step (filtered groups included): the policy's actual reward.
        total, count = self._arrived_rewards
        record["reward_arrived_mean"] = total / count if count else None
        record["samples_arrived"] = count
        self._arrived_rewards = [0.0, 0]
        self.metrics.write("step", **record)
        self._request_validation(control)
        if cfg.run.checkpoint_every_steps and learner.policy_version % cfg.run.checkpoint_every_steps == 0:
            await self.checkpoint()

    def _revise_bound(self, waited: float, step_s: float, now: float | None = None) -> int:
        """The staleness bound after this step: the fixed one, or :class:`AutoStaleness`'s revision."""
        if self.auto is None:
            return self.cfg.buffer.ceiling
        now = time.monotonic() if now is None else now
        idle = {source: float(g["idle_s"]) for source, g in self.generators.items()
                if isinstance(g.get("idle_s"), (int, float))}
        fraction = None
        if self._idle_mark is not None and idle:
            since, before = self._idle_mark
            deltas = [max(0.0, v - before.get(source, v)) for source, v in idle.items()]
            fraction = min(1.0, sum(deltas) / len(deltas) / max(now - since, 1e-9))
        self._idle_mark = (now, idle)
        previous = self.auto.bound
        bound = self.auto.update(waited / max(waited + step_s, 1e-9), fraction)
        if bound != previous:
            self.metrics.write("event", event="max_staleness", bound=bound, previous=previous,
                               learner_wait_fraction=round(waited / max(waited + step_s, 1e-9), 3),
                               generator_idle_fraction=None if fraction is None else round(fraction, 3))
        return bound

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
        buffer_state, samplers = self.buffer.state(), self.samplers.states()
        elapsed = self._elapsed_before_s if self._train_start is None else time.monotonic() - self._train_start
        service = {"groups_arrived": self.arrived, "outcomes": dict(self.outcomes), "learner_idle_s": self.idle_s,
                   "train_elapsed_s": elapsed}
        if self.auto is not None:
            service["auto_staleness"] = self.auto.state()

        def write() -> Path:
            tmp = begin(final)
            self.learner.save_checkpoint(tmp)
            save_run_state(tmp, buffer_state, samplers, service)
            return commit(tmp, final)

        path = await trio.to_thread.run_sync(write)
        self._checkpointed = self.learner.policy_version
        self.metrics.write("event", event="checkpoint", path=str(path), version=self.learner.policy_version,
                           buffer_held=len(buffer_state["groups"]))
        return path

    def _done(self, start: float) -> bool:
        run = self.cfg.run
        if run.max_steps and self.learner.policy_version >= run.max_steps:
            return True
        return bool(run.time_budget_s and time.monotonic() - start >= run.time_budget_s)


def main(argv: list[str] | None = None) -> int:
    from prorl_async.config import load_config
    from prorl_async.supervisor.lifecycle import exit_with_parent

    args = sys.argv[1:] if argv is None else argv
    resume = None
    if len(args) == 3 and args[1] == "--resume":
        resume = Path(args[2])
    elif len(args) != 1:
        print("usage: python -m prorl_async.learner RUN_DIR [--resume CHECKPOINT_DIR]", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
    exit_with_parent()
    cfg = load_config(run_dir / "config.toml")
    service = LearnerService(cfg, run_dir, resume_from=resume)
    try:
        trio.run(service.serve)
    finally:
        service.metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
