"""The generator process: vLLM ``AsyncLLM`` kept full of groups, scored off the loop, sent to the learner.

The only module that imports vllm. Started by the supervisor as::

    python -m prorl_async.generator --config RUN_DIR/config.toml --generator-id 0 \\
        --groups tcp://127.0.0.1:5555 --control tcp://127.0.0.1:5556 [--metrics tcp://127.0.0.1:5557] \\
        [--weight-sync 127.0.0.1:29500] [--run-dir RUN_DIR] [--sampler-state FILE.json]

Exit codes: 0 after ``Stop``, 2 for a configuration problem (one line on stderr), 3 when the learner cannot
be reached (handshake), 1 for anything else.

One asyncio loop, four kinds of tasks:

- ``dispatch_loop`` starts a group (one vLLM request with ``n = group_size``, ``FINAL_ONLY`` output,
  ``logprobs=0``) whenever fewer than ``max_inflight_groups`` are in the engine and :class:`Admission` allows
  it (DESIGN.md section 4: groups started for versions ``>= learner_version - K`` stay within this
  generator's share of ``(K + 1) x batch_groups``; see :mod:`prorl_async.learner.prompts`); a group the learner's
  variance filter will drop gives its place back once sent (it can never fill a batch);
- one task per group: generate, score every sample in the :class:`ScoringPool` (other processes, per-sample
  timeout), send the ``TrajectoryGroup`` (a blocking ZeroMQ send in a thread: backpressure from the learner
  holds the group, not the loop);
- ``control_loop`` reads ``WeightsReady`` / ``Stop`` / ``Validate``. A newer version raises the learner version
  (admission), loads the weights in flight (:meth:`Generator.update_weights`, the one place weights change) and
  aborts the groups that version made too stale to use; their prompts are re-queued;
- periodic validation: on ``Validate(v, round)``, once the loaded weights are version ``>= v``, one task samples
  this generator's shard of the held-out split (prompt ``i`` of ``TaskMix.validation_tasks()`` when
  ``i % num_generators == generator_id``; ``eval.samples`` samples at ``eval.temperature`` / ``eval.top_p``)
  through the same engine, beside the training groups, scores it in the same pool and sends the rewards as
  ``Metrics`` parts on the groups socket (:mod:`prorl_async.eval.validation`). One validation runs at a time (a newer
  request waits, replacing an older waiting one); a failed prompt or shard is counted and logged, never fatal;
- ``heartbeat_loop`` sends ``Heartbeat`` and ``Metrics`` every ``heartbeat_s`` (to ``--metrics`` when given,
  else on the groups socket when it has room), the metrics carrying ``sampler_state``: the prompt position
  with every unfinished prompt re-queued, and ``sampler_inflight_seqs``: the group sequence numbers of those
  unfinished prompts and ``sampler_next_seq``, so that the learner can drop the ones whose groups it
  received after all (``run_state.SamplerLedger``) — a restarted generator given the corrected state loses no prompt.

SIGTERM (and the end of the supervisor, ``lifecycle.exit_with_parent``) stops it like ``Stop``: unfinished
groups are aborted, their prompts reported re-queued in the final status, the engine shut down.

Per-token policy versions come from vLLM itself: the engine labels every step's outputs with its weight
version (``update_weight_version``) and a finished completion carries ``weight_versions`` spans. The version
is set while generation is paused, right after the new weights are loaded and the prefix cache (running
requests included) is reset, so a token carries exactly the version of the weights that sampled it. Requests
are not restarted by an update (they are preempted and their KV recomputed with the new weights).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prorl_async.envs.scoring_pool import ScoringPool
from prorl_async.eval.validation import RESULTS_KEY, PromptRewards, encode_shard
from prorl_async.learner.buffer import variance_outcome
from prorl_async.learner.prompts import Admission, Draw, PromptSampler, generator_budget
from prorl_async.transport.messages import (
    Heartbeat,
    Limits,
    Metrics,
    Sample,
    Stop,
    TrajectoryGroup,
    Validate,
    WeightsReady,
)

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.tasks import Task

log = logging.getLogger("prorl_async.generator.service")

_CONTROL_POLL_S = 0.2
_SEND_POLL_S = 0.5


@dataclass
class _Inflight:
    draw: Draw
    start_version: int
    task: asyncio.Task[None]
    in_engine: bool = True


def engine_max_num_seqs(cfg: Config, engine_default: int) -> int:
    """``generator.max_num_seqs``, or (0) room for every sample of the training groups the generator keeps in
    flight, never below ``engine_default`` (vLLM's own, which validation requests may use)."""
    g = cfg.generator
    return g.max_num_seqs or max(g.max_inflight_groups * cfg.sampling.group_size, engine_default)


class Generator:
    """One generator process's state and loops; :func:`run_generator` builds and runs it."""

    def __init__(self, cfg: Config, generator_id: int, groups_ep: str, control_ep: str, metrics_ep: str | None,
                 weight_sync: tuple[str, int] | None, sampler_state: dict[str, Any] | None) -> None:
        from prorl_async.envs.tasks import TaskMix

        self.cfg, self.gid, self.source = cfg, generator_id, f"generator-{generator_id}"
        self.endpoints = (groups_ep, control_ep, metrics_ep)
        self.weight_sync = weight_sync
        self.mix = TaskMix(cfg.tasks)
        self.sampler = PromptSampler(cfg.run.seed, generator_id, cfg.generator.num_generators,
                                     [self.mix.train_size(i) for i in range(len(self.mix))],
                                     [spec.weight for spec in cfg.tasks.mix])
        if sampler_state is not None:
            self.sampler.restore(sampler_state)
        bound = cfg.buffer.initial_bound
        self.admission = Admission(self._budget(bound), bound, cfg.buffer.ceiling)
        self.learner_version = 0
        self.loaded_version = 0
        self.after_version = -1  # versions up to this one were broadcast before we joined the weight group
        self.weights_ok = True  # False after a partial update: sample nothing until a full one lands
        self.inflight: dict[int, _Inflight] = {}
        self.seq = 0
        self._covered_seq = 0  # every group seq below this is in a sampler state already sent on the groups socket
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self.counters: dict[str, int] = dict.fromkeys(
            ("groups_sent", "groups_filtered", "samples_sent", "tokens_sent", "groups_aborted_stale",
             "prompts_requeued", "prompts_too_long", "weight_updates", "weight_update_failures", "heartbeats_dropped",
             "validations_sent", "validations_failed", "validations_superseded", "validation_prompts_failed"), 0)
        self.last_update_s = 0.0
        self.started_at = time.monotonic()
        self._idle_s = 0.0  # time the engine held none of our requests (waiting on weights or admission)
        self._idle_since: float | None = time.monotonic()
        self.fatal: BaseException | None = None
        self.validation_wanted: Validate | None = None  # the newest request not started yet
        self.validation_task: asyncio.Task[None] | None = None
        self._validation_seen: set[tuple[int, int]] = set()
        self._validation_shard: list[tuple[str, Task]] | None = None  # (task label, task), built on first use
        # One thread per blocking socket: a backpressured group send must not starve control reads.
        self._threads = {name: ThreadPoolExecutor(1, thread_name_prefix=f"gen-{name}")
                         for name in ("control", "send", "status")}

    async def _blocking(self, name: str, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads[name], fn, *args)

    # ------------------------------------------------------------------------------------------ run

    async def run(self) -> int:
        import zmq

        from prorl_async.transport.sockets import Sender, Subscriber, Transport, handshake

        groups_ep, control_ep, metrics_ep = self.endpoints
        with Transport(self.cfg.transport, Limits.from_config(self.cfg)) as transport:
            self.control = Subscriber(transport, control_ep)
            self.groups = Sender(transport, zmq.PUSH, groups_ep)
            self.metrics = Sender(transport, zmq.PUB, metrics_ep) if metrics_ep else None
            first = await asyncio.to_thread(handshake, self.control, self.groups, self.source,
                                            self.cfg.transport.handshake_timeout_s)
            self.pool = ScoringPool(self.cfg.generator.reward_workers, self.cfg.generator.reward_timeout_s,
                                    self.cfg.generator.reward_function,
                                    [self.mix.train_problem(i, 0).to_dict() for i in range(len(self.mix))])
            self.engine = None
            try:
                await self.pool.launch()  # the scoring workers import in their own processes while the engine starts
                self.engine = self._start_engine()  # blocks the loop (~15 s): nothing else runs yet
                await self.pool.start()
                await self.engine.update_weight_version("0")
                if self.weight_sync is not None:
                    await self._join()
                await self._on_control(first)
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._terminate)
                control, heartbeat = (asyncio.create_task(c) for c in (self.control_loop(), self.heartbeat_loop()))
                dispatch = asyncio.create_task(self.dispatch_loop())
                await self.stopping.wait()
                dispatch.cancel()
                await self._abort_all("stop")
                await self._cancel_validation()
                await asyncio.gather(dispatch, control, heartbeat, return_exceptions=True)
                self._send_status(self.metrics_values(), final=True)
            finally:
                await self.pool.close()
                if self.engine is not None:
                    self.engine.shutdown()
                    self.engine = None  # collected now, not at interpreter exit (its __del__ shuts down again)
                for pool in self._threads.values():
                    pool.shutdown(wait=True)
        if self.fatal is not None:
            log.error("%s: stopped by an error; unfinished prompts are in the last sampler_state: %r", self.source,
                      self.fatal)
            return 1
        return 0

    def _start_engine(self) -> Any:
        from vllm.config import SchedulerConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from prorl_async.models import resolve_model
        from prorl_async.transport.weights.sender import EXTENSION

        g, m = self.cfg.generator, self.cfg.model
        logprobs_mode = "processed_logprobs" if self.cfg.learner.temperature_scaled_logprobs else "raw_logprobs"
        args = AsyncEngineArgs(model=str(resolve_model(m.name)), dtype=m.dtype, max_model_len=m.max_model_len,
                               enforce_eager=g.enforce_eager, gpu_memory_utilization=g.gpu_memory_utilization,
                               seed=self.cfg.run.seed + 1000 * self.gid, logprobs_mode=logprobs_mode,
                               worker_extension_cls=EXTENSION, disable_log_stats=True,
                               max_num_seqs=engine_max_num_seqs(self.cfg, SchedulerConfig.DEFAULT_MAX_NUM_SEQS))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        return AsyncLLM.from_engine_args(args)

    # -------------------------------------------------------------------------------------- control

    async def control_loop(self) -> None:
        """Ends after ``Stop`` (not cancelled: its socket read runs on a thread and must finish first)."""
        while not self.stopping.is_set():
            msg = await self._blocking("control", self.control.recv, _CONTROL_POLL_S)
            if msg is not None:
                await self._on_control(msg)

    def _budget(self, bound: int) -> int:
        """This generator's share of the admission capacity ``(bound + 1) x batch_groups``."""
        capacity = (bound + 1) * self.cfg.learner.batch_groups
        return generator_budget(capacity, self.cfg.generator.num_generators, self.gid,
                                self.cfg.generator.admission_groups)

    async def _on_control(self, msg: Any) -> None:
        if isinstance(msg, WeightsReady) and msg.max_staleness is not None:
            self._set_bound(msg.max_staleness)
        if isinstance(msg, Stop):
            log.info("%s: stop (%s)", self.source, msg.reason)
            self.stopping.set()
        elif isinstance(msg, Validate):
            self._on_validate(msg)
        elif isinstance(msg, WeightsReady) and msg.version > self.learner_version:
            self.learner_version = msg.version
            if self.weight_sync is not None:
                while self.loaded_version < self.learner_version and self.learner_version > self.after_version:
                    if not await self.update_weights(self.learner_version):
                        break
            await self._abort_stale()
            self.admission.forget_before(self.learner_version)
            self.changed.set()
            self._maybe_start_validation()

    def _set_bound(self, bound: int) -> None:
        """The learner's admission bound under ``max_staleness = "auto"`` (clamped to the configured ceiling)."""
        bound = min(bound, self.admission.ceiling)
        if bound != self.admission.max_staleness:
            log.info("%s: admission bound %d -> %d", self.source, self.admission.max_staleness, bound)
            self.admission.set_bound(bound, self._budget(bound))
            self.changed.set()

    async def _join(self) -> None:
        host, port = self.weight_sync  # type: ignore[misc]
        [info] = await self.engine.collective_rpc(
            "weight_sync_join", args=(self.cfg.weight_sync.model_dump(), host, port, self.gid,
                                      self.loaded_version if self.weights_ok else -1))
        self.after_version = info["after_version"]
        log.info("%s: joined the weight group as %s (after version %d)", self.source, info["member"],
                 self.after_version)

    async def update_weights(self, announced: int) -> bool:
        """THE update hook: load the next broadcast into the running engine, in flight; True when loaded.

        Generation is paused (requests kept) so that no engine step sees half-swapped weights; the prefix
        cache is reset with running requests included (their KV came from the old weights); the engine's
        weight version is set before resuming, so every later token is labelled with the new version.
        """
        start = time.perf_counter()
        await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            [got] = await self.engine.collective_rpc("weight_sync_receive", args=(announced,))
            await self.engine.reset_prefix_cache(reset_running_requests=True)
            await self.engine.update_weight_version(str(got["version"]))
            self.loaded_version, self.weights_ok = int(got["version"]), True
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
                await self._abort_all("partial weights")
            await self._join()  # the group is gone after any failure: join again for the next version
            return False
        finally:
            await self.engine.resume_generation()
            self.last_update_s = time.perf_counter() - start

    async def _abort_stale(self) -> None:
        floor = self.admission.oldest_kept(self.learner_version)
        # Only groups still generating: a finished one is sent anyway (the learner drops it, counted).
        stale = [f for f in self.inflight.values() if f.start_version < floor and f.in_engine]
        for f in stale:
            f.task.cancel()
        self.counters["groups_aborted_stale"] += len(stale)
        await asyncio.gather(*(f.task for f in stale), return_exceptions=True)

    async def _abort_all(self, why: str) -> None:
        tasks = [f.task for f in self.inflight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            log.info("%s: aborted %d groups (%s); their prompts are re-queued", self.source, len(tasks), why)

    # ----------------------------------------------------------------------------------- validation

    def _on_validate(self, msg: Validate) -> None:
        key = (msg.version, msg.round)
        if key in self._validation_seen or self.stopping.is_set():
            return  # control messages may repeat: each request is answered once
        self._validation_seen.add(key)
        if self.validation_wanted is not None:  # still waiting for weights or for the running one: keep the newest
            self.counters["validations_superseded"] += 1
            log.warning("%s: validation of version %d (round %d) superseded by version %d before it started",
                        self.source, self.validation_wanted.version, self.validation_wanted.round, msg.version)
        self.validation_wanted = msg
        self._maybe_start_validation()

    def _maybe_start_validation(self) -> None:
        """Start the waiting validation once none runs and the weights it asks for (or newer) are loaded."""
        want = self.validation_wanted
        if want is None or self.stopping.is_set():
            return
        if self.validation_task is not None and not self.validation_task.done():
            return
        if self.weight_sync is not None and (not self.weights_ok or self.loaded_version < want.version):
            return  # called again after each weight update
        self.validation_wanted = None
        self.validation_task = asyncio.create_task(self._validate(want))
        self.validation_task.add_done_callback(lambda _: self._maybe_start_validation())

    async def _cancel_validation(self) -> None:
        self.validation_wanted = None
        task = self.validation_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _shard(self) -> list[tuple[str, Task]]:
        """``(task label, task)`` of this generator's share of the held-out split, in split order."""
        if self._validation_shard is None:
            labels = [f"{s.domain}/{s.name}" for s in self.cfg.tasks.mix]
            names = [f"{x}#{i}" if labels.count(x) > 1 else x for i, x in enumerate(labels)]
            every = self.cfg.generator.num_generators
            self._validation_shard = [(names[t.metadata["spec"]], t) for i, t in enumerate(self.mix.validation_tasks())
                                      if i % every == self.gid]
        return self._validation_shard

    async def _validate(self, req: Validate) -> None:
        """Sample, score and report this generator's shard for ``req``; failures are counted and logged, not raised.

        Prompts that fail (engine or scoring error) are reported as ``failed`` and the shard is answered anyway, so
        the learner's record says what it is made of. Only an error outside the prompts (counted in
        ``validations_failed``) or a stop leaves it unanswered: the learner's timeout covers that.
        """
        start, weights = time.perf_counter(), self.loaded_version
        try:
            shard = self._shard()
            slots = asyncio.Semaphore(max(1, self.cfg.generator.max_inflight_groups))
            outcomes = await asyncio.gather(*(self._validate_prompt(req, i, label, task, slots)
                                              for i, (label, task) in enumerate(shard)), return_exceptions=True)
            prompts = [out for out in outcomes if isinstance(out, PromptRewards)]
            errors = [out for out in outcomes if isinstance(out, BaseException)]
            skipped = sum(out is None for out in outcomes)
            if errors:
                self.counters["validation_prompts_failed"] += len(errors)
                log.error("%s: validation of version %d: %d of %d prompts failed (first: %r)", self.source,
                          req.version, len(errors), len(shard), errors[0])
            header = dict(version=req.version, round=req.round, generator=self.gid,
                          generators=self.cfg.generator.num_generators, weights_version=weights,
                          seconds=time.perf_counter() - start, skipped=skipped)
            try:
                parts = encode_shard(**header, failed=len(errors), prompts=prompts)
            except ValueError as err:  # a prompt too big for one message: answer without the prompts
                log.error("%s: validation of version %d: %s", self.source, req.version, err)
                parts = encode_shard(**header, failed=len(errors) + len(prompts), prompts=[])
        except Exception:
            self.counters["validations_failed"] += 1
            log.exception("%s: validation of version %d (round %d) failed", self.source, req.version, req.round)
            return
        if await self._blocking("send", self._send_validation, parts):
            self.counters["validations_sent"] += 1
            log.info("%s: validation of version %d (round %d): %d prompts scored, %d failed, %d too long, %.1f s",
                     self.source, req.version, req.round, len(prompts), len(errors), skipped,
                     time.perf_counter() - start)

    async def _validate_prompt(self, req: Validate, i: int, label: str, task: Task,
                               slots: asyncio.Semaphore) -> PromptRewards | None:
        """``eval.samples`` scored samples of one held-out prompt; None when the prompt is too long."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from prorl_async.envs.tasks import render_prompt

        e, cfg = self.cfg.eval, self.cfg
        max_tokens = e.max_response_tokens or cfg.sampling.max_response_tokens
        async with slots:  # the engine holds at most max_inflight_groups validation requests of ours
            prompt_ids = self.tokenizer.encode(render_prompt(self.tokenizer, task, cfg.tasks), add_special_tokens=False)
            if len(prompt_ids) + max_tokens > cfg.model.max_model_len:
                return None
            # No per-request seed: vLLM's CPU build crashes on one (the engine is seeded per generator).
            params = SamplingParams(n=e.samples, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                                    max_tokens=max_tokens, stop=list(cfg.sampling.stop) or None,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                                  f"g{self.gid}.val{req.round}.v{req.version}.{i}"):
                final = out
        if final is None or len(final.outputs) != e.samples:
            raise RuntimeError(f"vLLM returned {0 if final is None else len(final.outputs)} of {e.samples} samples")
        task_dict = task.to_dict()
        results = await asyncio.gather(*(self.pool.score(cfg.tasks.prefill + c.text, task_dict)
                                         for c in final.outputs))
        return PromptRewards(task.id, label, tuple(r.reward for r in results))

    def _send_validation(self, parts: list[str]) -> bool:
        """Blocking send of every part on the groups socket (the learner's), in order; False if stopped first."""
        for text in parts:
            msg = Metrics(self.source, {RESULTS_KEY: text})
            while True:
                if self.stopping.is_set():
                    return False
                try:
                    self.groups.send(msg, timeout_s=_SEND_POLL_S)
                    break
                except TimeoutError:
                    continue
        return True

    # ------------------------------------------------------------------------------------- dispatch

    def _may_start(self) -> bool:
        in_engine = sum(f.in_engine for f in self.inflight.values())
        return (self.weights_ok and in_engine < self.cfg.generator.max_inflight_groups
                and self.admission.may_start(self.learner_version, self.loaded_version))

    async def dispatch_loop(self) -> None:
        while True:
            while not self._may_start():
                self.changed.clear()
                await self.changed.wait()
            draw = self.sampler.next()
            seq, self.seq = self.seq, self.seq + 1
            target = self.admission.start(self.learner_version, self.loaded_version)
            task = asyncio.create_task(self._group(seq, draw, self.loaded_version, target))
            self.inflight[seq] = _Inflight(draw, self.loaded_version, task)
            self._engine_activity()
            await asyncio.sleep(0)  # let the group submit its request before the next one

    async def _group(self, seq: int, draw: Draw, start_version: int, target: int) -> None:
        """Generate, score and send one group; ``target``: its admission slot (freed if it is not sent)."""
        sent = False
        try:
            sent = await self._generate_score_send(seq, draw, start_version, target)
        except asyncio.CancelledError:
            self.sampler.requeue(draw)
            self.counters["prompts_requeued"] += 1
            raise
        except Exception as err:  # the engine died or broke its contract: exit non-zero, the supervisor restarts us
            log.exception("%s: group %d failed", self.source, seq)
            self.sampler.requeue(draw)
            self.fatal = self.fatal or err
            self.stopping.set()
        finally:
            if not sent:
                self.admission.withdraw(target)
            self.inflight.pop(seq, None)
            self._engine_activity()
            self.changed.set()

    async def _generate_score_send(self, seq: int, draw: Draw, start_version: int, target: int) -> bool:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from prorl_async.envs.tasks import render_prompt

        s, cfg = self.cfg.sampling, self.cfg
        task = self.mix.train_problem(draw.spec, draw.index)
        prompt_ids = self.tokenizer.encode(render_prompt(self.tokenizer, task, cfg.tasks), add_special_tokens=False)
        if len(prompt_ids) + s.max_response_tokens > cfg.model.max_model_len:
            self.counters["prompts_too_long"] += 1
            log.warning("%s: prompt %s has %d tokens, too long for model.max_model_len %d: skipped", self.source,
                        task.id, len(prompt_ids), cfg.model.max_model_len)
            return False
        params = SamplingParams(n=s.group_size, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_tokens=s.max_response_tokens, stop=list(s.stop) or None, logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                              f"g{self.gid}.s{seq}"):
            final = out
        self.inflight[seq].in_engine = False
        self._engine_activity()
        self.changed.set()
        if final is None or len(final.outputs) != s.group_size:
            raise RuntimeError(f"vLLM returned {0 if final is None else len(final.outputs)} of {s.group_size} samples")
        task_dict = task.to_dict()
        results = await asyncio.gather(*(self.pool.score(cfg.tasks.prefill + c.text, task_dict)
                                         for c in final.outputs))
        samples = [_sample(c, start_version, r.reward, r.reason) for c, r in zip(final.outputs, results, strict=True)]
        group = TrajectoryGroup(prompt_id=task.id, task=task.name, domain=task.domain,
                                prompt_token_ids=np.asarray(prompt_ids, dtype=np.int32), samples=samples,
                                generator_id=self.gid, seq=seq)
        if seq >= self._covered_seq:
            # No sampler state that knows this draw has reached the groups socket yet: send one first, on the same
            # socket and thread, so that the learner never holds a group its saved prompt position does not cover
            # (a resume would draw that prompt again).
            values = self.metrics_values()
            if not await self._blocking("send", self._send_group, Metrics(self.source, values)):
                return False
            self._covered_seq = max(self._covered_seq, int(values["sampler_next_seq"]))
        if not await self._blocking("send", self._send_group, group):
            return False
        if cfg.buffer.variance_filter and variance_outcome(np.asarray([x.reward for x in samples]),
                                                           cfg.buffer.min_reward_std) != "admitted":
            # The learner drops it (counted by reason there): it will never fill a batch, so it must not hold a
            # place in the admission budget — else a run where many groups carry no signal starves at the bound.
            self.admission.withdraw(target)
            self.counters["groups_filtered"] += 1
            self.changed.set()
        self.counters["groups_sent"] += 1
        self.counters["samples_sent"] += len(samples)
        self.counters["tokens_sent"] += group.num_tokens
        return True

    def _send_group(self, group: TrajectoryGroup | Metrics) -> bool:
        """Blocking send that gives up only when the generator stops (backpressure: the group waits)."""
        while not self.stopping.is_set():
            try:
                self.groups.send(group, timeout_s=_SEND_POLL_S)
                return True
            except TimeoutError:
                continue
        return False

    # ------------------------------------------------------------------------------------- metrics

    async def heartbeat_loop(self) -> None:
        """Ends after ``Stop``; the final status is sent by :meth:`run` once every group is settled."""
        while not self.stopping.is_set():
            values = self.metrics_values()  # the snapshot is taken on the loop
            if await self._blocking("status", self._send_status, values):
                self._covered_seq = max(self._covered_seq, int(values["sampler_next_seq"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.generator.heartbeat_s)

    def _engine_activity(self) -> None:
        """Keep ``_idle_s``: time during which the engine held none of our requests (weights, admission)."""
        busy = any(f.in_engine for f in self.inflight.values())
        now = time.monotonic()
        if busy and self._idle_since is not None:
            self._idle_s += now - self._idle_since
            self._idle_since = None
        elif not busy and self._idle_since is None:
            self._idle_since = now

    def metrics_values(self) -> dict[str, int | float | str]:
        now = time.monotonic()
        elapsed = max(now - self.started_at, 1e-9)
        idle_s = self._idle_s + (now - self._idle_since if self._idle_since is not None else 0.0)
        in_flight = list(self.inflight.items())
        return {
            **self.counters,
            **{f"score_{k}": v for k, v in self.pool.counters.items()},
            "score_seconds": round(self.pool.score_seconds, 3),
            "requests_in_flight": sum(f.in_engine for f in self.inflight.values()),
            "groups_in_flight": len(self.inflight),
            "policy_version": self.loaded_version,
            "learner_version": self.learner_version,
            "admission_budget": self.admission.budget,
            "admission_bound": self.admission.max_staleness,
            "admission_counted": self.admission.counted(self.learner_version),
            "tokens_per_s": self.counters["tokens_sent"] / elapsed,
            "idle_ratio": round(idle_s / elapsed, 4),
            "idle_s": round(idle_s, 3),
            "weight_update_s": self.last_update_s,
            "sampler_state": json.dumps(self.sampler.state(in_flight=[f.draw for _, f in in_flight]),
                                        separators=(",", ":")),
            "sampler_inflight_seqs": json.dumps([seq for seq, _ in in_flight], separators=(",", ":")),
            "sampler_next_seq": self.seq,
        }

    def _terminate(self) -> None:
        log.info("%s: SIGTERM: stopping (unfinished prompts are re-queued in the final status)", self.source)
        self.stopping.set()

    def _send_status(self, values: dict[str, int | float | str], final: bool = False) -> bool:
        """Heartbeat + metrics; True when the metrics went out on the groups socket (ordered with the groups)."""
        if final:
            values["final"] = 1
        sent = False
        for msg in (Heartbeat(self.source, time.time()), Metrics(self.source, values)):
            try:
                (self.metrics or self.groups).send(msg, timeout_s=0.1 if self.metrics is None else None)
                sent = self.metrics is None
            except TimeoutError:  # the groups socket is full (backpressure): a heartbeat is not worth waiting for
                self.counters["heartbeats_dropped"] += 1
                sent = False
        return sent


def _sample(c: Any, start_version: int, reward: float, reason: str) -> Sample:
    """A Sample from a finished vLLM completion; versions from the engine's weight-version spans."""
    ids = np.asarray(c.token_ids, dtype=np.int32)
    logprobs = np.asarray([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)], dtype=np.float32)
    versions = np.full(len(ids), start_version, dtype=np.int32)
    for span in getattr(c, "weight_versions", None) or []:
        versions[span.start : span.end] = int(span.version)
    # vLLM reports -inf for a token the processed distribution gave no mass (cannot happen for a sampled token,
    # but a wire message must hold finite log-probs): clamp to the float32 floor.
    logprobs = np.maximum(np.nan_to_num(logprobs, nan=-1e30, neginf=-1e30), np.float32(-1e30))
    return Sample(ids, np.minimum(logprobs, 0.0), versions, str(c.finish_reason or "abort"), reward, reason)


# ------------------------------------------------------------------------------------------ entry


def run_generator(cfg: Config, generator_id: int, groups_endpoint: str, control_endpoint: str, *,
                  metrics_endpoint: str | None = None, weight_sync: tuple[str, int] | None = None,
                  run_dir: str | Path | None = None, sampler_state: dict[str, Any] | None = None) -> int:
    """Run one generator until ``Stop``; returns the exit code (module docstring)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.generator.kv_cache_gib)))  # int GiB only
    # VLLM_CACHE_ROOT stays vLLM's default (or the user's): a fresh cache per run made vLLM inspect the model in
    # a subprocess that imports vllm again (engine start ~60 s instead of ~7 s on 2 loaded cores).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gen = Generator(cfg, generator_id, groups_endpoint, control_endpoint, metrics_endpoint, weight_sync,
                    sampler_state)
    return asyncio.run(gen.run())


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
    p.add_argument("--metrics", default=None, help="a metrics collector (SUB) endpoint; default: the groups socket")
    p.add_argument("--weight-sync", default=None, metavar="HOST:PORT", help="the learner's weight-sync store")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--sampler-state", default=None, help="JSON file: a sampler_state from this generator's metrics")
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
        state = json.loads(Path(args.sampler_state).read_text()) if args.sampler_state else None
        return run_generator(cfg, args.generator_id, args.groups, args.control, metrics_endpoint=args.metrics,
                             weight_sync=ws, run_dir=args.run_dir, sampler_state=state)
    except TransportError as err:
        print(f"generator {args.generator_id}: {err}", file=sys.stderr)
        return 3
    except (UserError, ValueError, OSError) as err:
        print(f"generator {args.generator_id}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
