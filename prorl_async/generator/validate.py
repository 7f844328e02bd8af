"""A generator's side of periodic validation: its shard of the held-out split, sampled and scored on request.

On ``Validate(v, round)``, once the loaded weights are version ``>= v``, one task samples this generator's shard
(prompt ``i`` of ``TaskMix.validation_tasks()`` when ``i % num_generators == generator_id``; ``eval.samples``
samples at ``eval.temperature`` / ``eval.top_p``) through the same engine as the training groups
(:func:`prorl_async.generator.rollout.sample`), scores it in the same pool and sends the rewards as
``ValidationAnswer`` messages (:func:`prorl_async.eval.validation.encode_shard`) with the lowest and highest
weight version its tokens were sampled under: the learner trains on meanwhile, so a shard can span versions.

Invariants: one validation runs at a time (a newer request waits, replacing an older waiting one); each
``(version, round)`` is answered once (control messages may repeat); a prompt that fails is counted and the shard
answered anyway, so the learner's record says what it is made of; only a stop, or an error outside the prompts,
leaves a request unanswered — the learner's timeout covers that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prorl_async.envs.curriculum import spec_labels
from prorl_async.eval.validation import PromptRewards, encode_shard
from prorl_async.generator import rollout
from prorl_async.generator.engine import Sampling

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.scoring_pool import ScoringPool
    from prorl_async.envs.tasks import Task, TaskMix
    from prorl_async.generator.engine import Engine
    from prorl_async.transport.messages import Validate

log = logging.getLogger("prorl_async.generator")


class Validator:
    """Validation requests of one generator. ``send``: sends messages in order (False when stopped first);
    ``weights``: the version of the loaded weights (-1 while they are a broken mix)."""

    def __init__(self, cfg: Config, generator_id: int, mix: TaskMix, engine: Engine, pool: ScoringPool,
                 send: Callable[[list[Any]], Awaitable[bool]], weights: Callable[[], int]) -> None:
        self.cfg, self.gid, self.mix, self.engine, self.pool = cfg, generator_id, mix, engine, pool
        self.send, self.weights = send, weights
        self.source = f"generator-{generator_id}"
        self.sampling = Sampling.evaluation(cfg)
        self.wanted: Validate | None = None  # the newest request not started yet
        self.task: asyncio.Task[None] | None = None
        self._seen: set[tuple[int, int]] = set()
        self._shard: list[tuple[str, Task]] | None = None  # (task label, task), built on first use
        self.counters = dict.fromkeys(("validations_sent", "validations_failed", "validations_superseded",
                                       "validation_prompts_failed"), 0)

    def request(self, msg: Validate) -> None:
        key = (msg.version, msg.round)
        if key in self._seen:
            return
        self._seen.add(key)
        if self.wanted is not None:  # still waiting for weights or for the running one: keep the newest
            self.counters["validations_superseded"] += 1
            log.warning("%s: validation of version %d (round %d) superseded by version %d before it started",
                        self.source, self.wanted.version, self.wanted.round, msg.version)
        self.wanted = msg
        self.weights_changed()

    def weights_changed(self) -> None:
        """Start the waiting request once none runs and the weights it asks for (or newer) are loaded."""
        want = self.wanted
        if want is None or (self.task is not None and not self.task.done()) or self.weights() < want.version:
            return
        self.wanted = None
        self.task = asyncio.create_task(self._validate(want))
        self.task.add_done_callback(lambda _: self.weights_changed())

    async def cancel(self) -> None:
        self.wanted = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def shard(self) -> list[tuple[str, Task]]:
        """``(task label, task)`` of this generator's share of the held-out split, in split order."""
        if self._shard is None:
            names = spec_labels(self.cfg.tasks.mix)
            every = self.cfg.generator.num_generators
            self._shard = [(names[t.metadata["spec"]], t) for i, t in enumerate(self.mix.validation_tasks())
                           if i % every == self.gid]
        return self._shard

    async def _validate(self, req: Validate) -> None:
        start, weights = time.perf_counter(), self.weights()
        try:
            shard = self.shard()
            slots = asyncio.Semaphore(max(1, self.cfg.generator.max_inflight_groups))
            outcomes = await asyncio.gather(*(self._prompt(req, i, label, task, slots)
                                              for i, (label, task) in enumerate(shard)), return_exceptions=True)
            drawn = [out for out in outcomes if isinstance(out, tuple)]
            prompts = [rewards for rewards, _ in drawn]
            versions = [v for _, span in drawn for v in span] or [weights]
            errors = [out for out in outcomes if isinstance(out, BaseException)]
            skipped = sum(out is None for out in outcomes)
            if errors:
                self.counters["validation_prompts_failed"] += len(errors)
                log.error("%s: validation of version %d: %d of %d prompts failed (first: %r)", self.source,
                          req.version, len(errors), len(shard), errors[0])
            answers = encode_shard(source=self.source, version=req.version, round=req.round, generator=self.gid,
                                   generators=self.cfg.generator.num_generators,
                                   weights_version=(min(versions), max(versions)),
                                   seconds=time.perf_counter() - start, failed=len(errors), skipped=skipped,
                                   prompts=prompts)
        except Exception:
            self.counters["validations_failed"] += 1
            log.exception("%s: validation of version %d (round %d) failed", self.source, req.version, req.round)
            return
        if await self.send(answers):
            self.counters["validations_sent"] += 1
            log.info("%s: validation of version %d (round %d): %d prompts scored, %d failed, %d too long, %.1f s",
                     self.source, req.version, req.round, len(prompts), len(errors), skipped,
                     time.perf_counter() - start)

    async def _prompt(self, req: Validate, i: int, label: str, task: Task,
                      slots: asyncio.Semaphore) -> tuple[PromptRewards, tuple[int, ...]] | None:
        """``eval.samples`` scored samples of one held-out prompt and the lowest and highest weight version their
        tokens were sampled under; None when the prompt is too long."""
        async with slots:  # the engine holds at most max_inflight_groups validation requests of ours
            prompt_ids = rollout.render(self.engine.tokenizer, task, self.cfg, self.sampling.max_tokens)
            if prompt_ids is None:
                return None
            done = await rollout.sample(self.engine, self.pool, self.cfg, task, prompt_ids, self.sampling,
                                        f"g{self.gid}.val{req.round}.v{req.version}.{i}")
        versions = [c.versions for c in done.completions if len(c.versions)]
        span = (min(int(v.min()) for v in versions), max(int(v.max()) for v in versions)) if versions else ()
        return PromptRewards(task.id, label, tuple(r.reward for r in done.scores)), span
