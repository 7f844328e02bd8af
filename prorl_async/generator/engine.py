"""vLLM behind four calls: start an engine, sample a group, load broadcast weights, stop. The only vLLM importer.

Two engines share the sampling contract (:class:`Sampling` in, :class:`Completion` out):

- :class:`Engine`: ``AsyncLLM`` for a generator process (the engine core in a child process, the weight-sync
  worker extension loaded, continuous batching across groups);
- :func:`generate_offline`: vLLM's offline ``LLM`` for ``prorl-async eval`` (on CPU in this process: no engine
  process that imports torch and vLLM again).

Invariants:

- A completion's tokens carry the weight version that sampled them: the engine labels every step's output with
  its weight version, which :meth:`Engine.load_weights` sets while generation is paused, after the new weights
  are loaded and the prefix cache (running requests included) is reset. Requests are not restarted by an update
  (preempted, their KV recomputed with the new weights).
- A group is one request with ``n`` samples and ``FINAL_ONLY`` output (the cumulative kind could end with fewer
  than ``n`` completions); fewer than ``n`` is an error, never a short group.
- Cancelling :meth:`Engine.generate` aborts the request in the engine.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from prorl_async.config import Config



@dataclass(frozen=True)
class Sampling:
    """What to sample for one prompt (vLLM's SamplingParams, minus what this project never varies)."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    logprobs: bool = True
    """Return the sampled tokens' log-probs (training needs them; evaluation does not)."""

    @classmethod
    def training(cls, cfg: Config) -> Sampling:
        s = cfg.sampling
        return cls(s.group_size, s.temperature, s.top_p, s.top_k, s.max_response_tokens, tuple(s.stop))

    @classmethod
    def evaluation(cls, cfg: Config) -> Sampling:
        e = cfg.eval
        max_tokens = e.max_response_tokens or cfg.sampling.max_response_tokens
        return cls(e.samples, e.temperature, e.top_p, e.top_k, max_tokens, tuple(cfg.sampling.stop), logprobs=False)


@dataclass
class Completion:
    """One sample: its text, tokens, per-token behaviour log-probs and policy versions, and why it ended."""

    text: str
    token_ids: np.ndarray
    """(T,) int32."""
    logprobs: np.ndarray | None
    """(T,) float32, finite and <= 0; None when not asked for."""
    versions: np.ndarray
    """(T,) int32 weight version of each token."""
    finish_reason: str


def prepare_environment(cfg: Config) -> None:
    """Environment vLLM reads at import: its CPU KV cache (whole GiB), no tokenizer thread pools."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.generator.kv_cache_gib)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_max_num_seqs(cfg: Config, engine_default: int) -> int:
    """``generator.max_num_seqs``, or (0) room for every sample of the training groups the generator keeps in
    flight, never below ``engine_default`` (vLLM's own, which validation requests may use)."""
    g = cfg.generator
    return g.max_num_seqs or max(g.max_inflight_groups * cfg.sampling.group_size, engine_default)


def _params(s: Sampling) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # No per-request seed: vLLM's CPU build crashes on one (the engine is seeded per process).
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                          stop=list(s.stop) or None, logprobs=0 if s.logprobs else None,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def _completion(c: Any, version: int, with_logprobs: bool, *, versioned: bool = True) -> Completion:
    """``versioned``: the engine labels tokens with weight versions (an :class:`Engine`; the offline one does not:
    its label is vLLM's placeholder, and its tokens all carry ``version``)."""
    ids = np.asarray(c.token_ids, dtype=np.int32)
    versions = np.full(len(ids), version, dtype=np.int32)
    for span in (getattr(c, "weight_versions", None) or []) if versioned else []:
        versions[span.start : span.end] = int(span.version)
    logprobs = None
    if with_logprobs:
        lp = np.asarray([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)], dtype=np.float32)
        # -inf for a token the processed distribution gave no mass (not for a sampled token, but a wire message
        # holds finite log-probs): clamp to the float32 floor.
        logprobs = np.minimum(np.maximum(np.nan_to_num(lp, nan=-1e30, neginf=-1e30), np.float32(-1e30)), 0.0)
    return Completion(c.text, ids, logprobs, versions, str(c.finish_reason or "abort"))


class Engine:
    """An ``AsyncLLM`` for one generator process. Build with :meth:`start` (blocks ~15 s), end with :meth:`shutdown`."""

    def __init__(self, llm: Any, tokenizer: Any) -> None:
        self.llm, self.tokenizer = llm, tokenizer
        self.version = 0  # the weight version tokens sampled now carry

    @classmethod
    def start(cls, cfg: Config, seed: int) -> Engine:
        from transformers import AutoTokenizer
        from vllm.config import SchedulerConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from prorl_async.models import resolve_model
        from prorl_async.transport.weights.sender import EXTENSION

        g, m = cfg.generator, cfg.model
        logprobs_mode = "processed_logprobs" if cfg.learner.temperature_scaled_logprobs else "raw_logprobs"
        args = AsyncEngineArgs(model=str(resolve_model(m.name)), dtype=m.dtype, max_model_len=m.max_model_len,
                               enforce_eager=g.enforce_eager, gpu_memory_utilization=g.gpu_memory_utilization,
                               seed=seed, logprobs_mode=logprobs_mode, disable_log_stats=True,
                               worker_extension_cls=EXTENSION, tensor_parallel_size=g.tensor_parallel_size,
                               max_num_seqs=engine_max_num_seqs(cfg, SchedulerConfig.DEFAULT_MAX_NUM_SEQS))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        return cls(AsyncLLM.from_engine_args(args), tokenizer)

    async def set_version(self, version: int) -> None:
        await self.llm.update_weight_version(str(version))
        self.version = version

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> list[Completion]:
        """All ``sampling.n`` completions of one prompt; raises RuntimeError if the engine returns fewer."""
        from vllm.inputs import TokensPrompt

        start_version, final = self.version, None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), _params(sampling), request_id):
            final = out
        if final is None or len(final.outputs) != sampling.n:
            raise RuntimeError(f"vLLM returned {0 if final is None else len(final.outputs)} of {sampling.n} samples")
        return [_completion(c, start_version, sampling.logprobs) for c in final.outputs]

    async def join(self, cfg_weight_sync: dict[str, Any], host: str, port: int, generator_id: int,
                   holding: int) -> dict[str, Any]:
        """Join the learner's weight group (``holding``: the version these weights are, -1 for a broken mix)."""
        [info] = await self.llm.collective_rpc("weight_sync_join",
                                               args=(cfg_weight_sync, host, port, generator_id, holding))
        return info

    async def load_weights(self, announced: int) -> int:
        """Receive the broadcast of ``announced`` into the running engine; returns the version loaded.

        Generation is paused (requests kept) so that no engine step sees half-swapped weights; raises what the
        receive raised (the weights may then be a mix of versions when streaming)."""
        await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            [got] = await self.llm.collective_rpc("weight_sync_receive", args=(announced,))
            await self.llm.reset_prefix_cache(reset_running_requests=True)
            await self.set_version(int(got["version"]))
            return self.version
        finally:
            await self.llm.resume_generation()

    def shutdown(self) -> None:
        self.llm.shutdown()


def generate_offline(cfg: Config, model_dir: str, prompts: list[list[int]], sampling: Sampling
                     ) -> tuple[list[list[Completion]], dict[str, Any]]:
    """Every prompt's completions with vLLM's offline ``LLM`` (``prorl-async eval``); returns (completions in
    prompt order, timings)."""
    prepare_environment(cfg)
    import torch

    if not torch.cuda.is_available():
        # On CPU, the engine in this process: no engine-core and worker processes that import torch and vllm
        # again. With a GPU, vLLM's engine process overlaps scheduling with the device. The environment wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    executor = {"distributed_executor_backend": "uni"} if in_process else {}
    llm = LLM(model=model_dir, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
              enforce_eager=cfg.generator.enforce_eager, gpu_memory_utilization=cfg.generator.gpu_memory_utilization,
              seed=cfg.run.seed, disable_log_stats=True, **executor)
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], _params(sampling),
                           use_tqdm=False) if prompts else []
    generate_s = time.perf_counter() - start
    groups = []
    for out in outputs:
        if len(out.outputs) != sampling.n:
            raise RuntimeError(f"vLLM returned {len(out.outputs)} of {sampling.n} samples")
        groups.append([_completion(c, 0, sampling.logprobs, versioned=False) for c in out.outputs])
    return groups, {"engine_start_s": engine_s, "generate_s": generate_s, "engine_in_process": in_process}
