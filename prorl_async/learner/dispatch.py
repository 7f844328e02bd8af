"""Dispatch: the learner hands its prompts to generators as ``GroupRequest``s within admission (DESIGN.md section 4).

Invariants:

- The learner owns the prompt order and admission (:class:`~prorl_async.learner.prompts.PromptSource`): every prompt
  is handed out as a request to one live generator and answered once, by its group or a return. A generator that
  restarts (its new process's ``Ready``) has its previous process's requests handed out again; a group or a return
  answering a request not in flight at that generator is refused (:meth:`Dispatcher.request_for` is None,
  :meth:`Dispatcher.on_returned` False), so no prompt is lost and none is trained on twice.
- :meth:`Dispatcher.publish_weights` is the one place that publishes ``WeightsReady``: it moves admission to the bound
  it announces first, so every request issued after it obeys the bound the generators were told.
- :meth:`Dispatcher.dispatch_loop` issues round-robin, one request per live generator per pass, while admission and
  each generator's share allow; it is woken by every answer, restart and published version, and polls at least every
  ``_DISPATCH_POLL_S``. After :meth:`Dispatcher.stop` (training ended) it issues nothing.
- Every requested group that arrives, kept or dropped by the variance filter, is observed once, in
  :meth:`Dispatcher.answered`, with the spec and the curriculum level of the request it answers: it moves that spec's
  level (an ``event=curriculum_level`` record when it does), its prompt's skip record and its spec's drawing share
  (the task balance). Each request carries its spec's level as it was when issued (``GroupRequest.level``); the step
  record shows all three (:meth:`admission_figures`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from prorl_async.envs.curriculum import Curriculum, spec_labels
from prorl_async.learner.balance import TaskBalance
from prorl_async.learner.prompts import Admission, PromptSampler, PromptSource, Request, merge_shard_states
from prorl_async.learner.skips import PromptSkips
from prorl_async.transport.messages import GroupRequest, Ready, RequestReturned, TrajectoryGroup, WeightsReady

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.monitor.metrics import MetricsLog

log = logging.getLogger("prorl_async.learner.dispatch")

_DISPATCH_POLL_S = 0.2


def admission_budget(cfg: Config, bound: int) -> int:
    """How many requests may hold admission slots at ``bound``: ``(bound + 1) x batch_groups`` (DESIGN.md section 4),
    or ``generator.admission_groups`` per generator when set."""
    g = cfg.generator
    if g.admission_groups > 0:
        return g.admission_groups * g.num_generators
    return (bound + 1) * cfg.learner.batch_groups


def prompt_source(cfg: Config) -> PromptSource:
    """The run's prompt order (one stream over the task mix, seeded by ``run.seed``), admission, the curriculum
    (``tasks.curriculum``; the levels are the mix's own, as every generator computes them), prompt skipping
    (``tasks.skip``, for the specs without a curriculum) and the task balance (``tasks.balance``, over the mix's
    weights)."""
    from prorl_async.envs.tasks import TaskMix

    mix = TaskMix(cfg.tasks)
    specs = range(len(mix))
    weights, labels = [spec.weight for spec in cfg.tasks.mix], spec_labels(cfg.tasks.mix)
    sampler = PromptSampler(cfg.run.seed, 0, 1, [mix.train_size(i) for i in specs], weights)
    bound = cfg.buffer.initial_bound
    admission = Admission(admission_budget(cfg, bound), bound, cfg.buffer.ceiling)
    levels = [mix.levels(i) for i in specs]
    skip = cfg.tasks.skip
    skips = PromptSkips(cfg.run.seed, [skip.enabled and n == 1 for n in levels], labels,
                        max_probability=skip.max_probability, max_per_draw=skip.max_per_draw,
                        min_reward_std=cfg.buffer.min_reward_std)
    b = cfg.tasks.balance
    balance = TaskBalance(weights, labels, enabled=b.enabled, window_groups=b.window_groups, min_share=b.min_share)
    return PromptSource(sampler, admission, per_generator=2 * cfg.generator.max_inflight_groups,
                        curriculum=Curriculum.from_config(cfg.tasks, levels), skips=skips, balance=balance)


def generator_id(source: str, num_generators: int) -> int | None:
    """``generator-<i>`` -> i when ``0 <= i < num_generators``, else None."""
    prefix, _, number = source.rpartition("-")
    if prefix != "generator" or not number.isdigit() or int(number) >= num_generators:
        return None
    return int(number)


class Dispatcher:
    """The run's prompt source, the live generators and the requests handed to them; publishes ``WeightsReady``.

    ``bound`` answers the staleness bound to announce with each ``WeightsReady`` (None: the configured one).

    Usage (inside trio; ``control`` publishes on the control socket)::

        dispatch = Dispatcher(cfg, metrics, bound=lambda: None)
        nursery.start_soon(dispatch.dispatch_loop, control, lambda: learner.policy_version)
        dispatch.on_ready(Ready("generator-0"))          # requests go to generator 0 from now on
        request = dispatch.request_for(group)            # None: answers no request in flight, drop it
        dispatch.answered(group, kept=True)
        dispatch.publish_weights(control, version=1)     # frees the slots version 0 held
    """

    def __init__(self, cfg: Config, metrics: MetricsLog, bound: Callable[[], int | None]) -> None:
        self.cfg, self.metrics, self._bound = cfg, metrics, bound
        self.prompts = prompt_source(cfg)
        self.live: dict[int, str] = {}  # generator id -> source, once its current process has said Ready
        self.published_version = 0  # the latest WeightsReady: the weights generators hold or are receiving
        self._wake = trio.Event()
        self._dispatching = True  # False once training ends: no new requests

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Training ended: hand out no more requests."""
        self._dispatching = False

    def on_ready(self, msg: Ready) -> bool:
        """A generator process started (first or restarted): requests its previous process held are handed out
        again, and requests go to the new one from now on. False for a source that is not a generator of this run."""
        gid = generator_id(msg.source, self.cfg.generator.num_generators)
        if gid is None:
            self.metrics.write("event", event="unknown_generator", source=msg.source[:200])
            return False
        orphaned = self.prompts.orphan(gid)
        self.live[gid] = msg.source
        self.metrics.write("event", event="generator_ready", source=msg.source, requests_reissued=orphaned)
        self._wake.set()
        return True

    def on_returned(self, msg: RequestReturned) -> bool:
        """A generator gave a request back without a group; False when it is not in flight at that generator."""
        request = self.prompts.inflight.get(msg.request_id)
        if request is None or request.generator != msg.generator_id:
            return False
        self.prompts.returned(msg.request_id, msg.reason)
        self._wake.set()
        return True

    def request_for(self, group: TrajectoryGroup) -> Request | None:
        """The request in flight that ``group`` answers, or None: answered already, handed out again after its
        generator restarted (its current request answers it), or from before the checkpoint this run resumed from.
        A group with None is never trained on."""
        request = self.prompts.inflight.get(group.seq)
        if request is None or request.generator != group.generator_id:
            return None
        return request

    def answered(self, group: TrajectoryGroup, *, kept: bool) -> None:
        """``group`` answered its request; ``kept`` False (the learner cannot train on it) frees its slot. Its rewards
        feed the curriculum and the skip record of the request's prompt, whether the buffer keeps it or not."""
        request = self.prompts.answered(group.seq, kept=kept)
        change = self.prompts.observe(request, group.rewards) if request is not None else None
        if change is not None:
            log.info("curriculum: %s moves from level %d to %d of %d (pass rate %.2f over %d groups)", change.label,
                     change.previous, change.level, change.levels, change.pass_rate, change.groups)
            self.metrics.write("event", event="curriculum_level", **change.as_dict())
        self._wake.set()

    def withdraw(self, request: Request) -> None:
        """The buffer dropped the group that answered ``request``: it will never fill a batch, its slot is free."""
        self.prompts.admission.withdraw(request.target)

    def publish_weights(self, control: Any, version: int) -> None:
        """``WeightsReady(version)`` with the bound to obey; admission moves to that bound first."""
        bound = self._bound()
        if bound is not None and bound != self.prompts.admission.max_staleness:
            self.prompts.admission.set_bound(bound, admission_budget(self.cfg, bound))
        control.publish(WeightsReady(version=version, max_staleness=bound))
        self.published_version = version
        self._wake.set()

    def republish(self, control: Any) -> None:
        """The latest ``WeightsReady`` again: the control socket's latest message answers a new subscriber."""
        self.publish_weights(control, self.published_version)

    async def dispatch_loop(self, control: Any, learner_version: Callable[[], int]) -> None:
        """Hand prompts to generators as admission allows (the learner owns prompt order and admission).

        Woken by every answer, restart and published version, and at least every ``_DISPATCH_POLL_S``."""
        cursor = 0
        while True:
            with trio.move_on_after(_DISPATCH_POLL_S):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self._dispatching:
                continue
            version = learner_version()
            self.prompts.admission.forget_before(version)
            live = sorted(self.live)
            issued = True
            while issued and live:  # round-robin: one request per generator per pass
                issued = False
                for gid in live[cursor % len(live):] + live[:cursor % len(live)]:
                    request = self.prompts.issue(gid, version, self.published_version)
                    if request is None:
                        continue
                    request_id, draw, min_version = request
                    level = self.prompts.inflight[request_id].level
                    control.publish(GroupRequest(generator_id=gid, request_id=request_id, spec=draw.spec,
                                                 index=draw.index, epoch=draw.epoch, min_version=min_version,
                                                 level=level),
                                    latest=False)
                    issued = True
                cursor += 1

    def state(self) -> dict[str, Any]:
        """For a checkpoint: the prompt order with the requests in flight re-queued (``PromptSource.state``)."""
        return self.prompts.state()

    def restore(self, state: dict[str, Any]) -> None:
        """From a checkpoint's :meth:`state`, or from the per-generator sampler states of one written before the
        learner owned the prompt order (converted: ``prompt_order_converted``)."""
        if "shards" in state:
            state = {"sampler": merge_shard_states(state["shards"].values()), "next_request_id": 0}
            self.metrics.write("event", event="prompt_order_converted")
        self.prompts.restore(state)

    def admission_figures(self, learner_version: int) -> dict[str, Any]:
        """The learner's admission, requests, curriculum, prompt skipping and task balance, for the step record.

        ``curriculum``: per spec with one, ``{"level", "levels", "pass_rate", "groups"}`` (the current level's window
        so far); ``prompt_skips``: draws passed over so far per spec that skips; ``prompt_skip_rate``: their share
        of all the stream's draws so far; ``task_shares``: per spec, while the balance is active (enabled, more than
        one spec), ``{"share", "informative", "groups"}`` (its drawing share, informative estimate and window)."""
        p = self.prompts
        a = p.admission
        skipped = sum(p.skips.skipped)
        return {"admission_bound": a.max_staleness, "admission_budget": a.budget,
                "admission_counted": a.counted(learner_version), "requests_in_flight": len(p.inflight),
                "requests": dict(p.counts), "curriculum": p.curriculum.summary(), "prompt_skips": p.skips.summary(),
                "prompt_skip_rate": round(skipped / p.sampler.draws, 4) if p.sampler.draws else 0.0,
                "task_shares": p.balance.summary()}
