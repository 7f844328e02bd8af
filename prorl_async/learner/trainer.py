"""The ProRL learner: policy, frozen reference and AdamW; ``train_step(batch) -> StepMetrics``. No sockets.

One ``train_step`` takes a :class:`prorl_async.learner.batch.GroupBatch` of whole groups and makes
``learner.mini_batches`` optimizer steps. Two counters, never mixed: ``policy_version`` advances once per
``train_step`` (one batch, one weight broadcast: what generators sample with, what staleness and every
``*_every_steps`` setting count);
``optimizer_step`` once per AdamW update (the learning-rate warm-up counts it):

1. group advantages over the whole batch (``prorl_async.algo.advantage.group_advantage``);
2. proximal log-probs: with one mini-batch they are the gradient pass's own values, detached (one forward);
   with several, a no-grad pass over the batch first, so that every mini-batch sees the same old policy;
3. per mini-batch: rows sorted by length into micro-batches of at most ``micro_batch_tokens`` padded
   tokens (rows x longest row, so padding stays small; with ``learner.attention = "flex_attention"`` one
   packed row of whole units, no padding), reference log-probs without gradient, policy
   log-probs with gradient, the ProRL loss over the mini-batch's token count, backward per micro-batch
   (gradient accumulation), clipping, warm-up then constant learning rate, AdamW;
4. the reset policy (:mod:`prorl_async.learner.reset`) may then hard-reset the reference and the optimizer.

A row is a group's prompt followed by its responses (``learner.share_prompt``, :mod:`prorl_async.learner.packing`):
every pass (proximal, reference, policy) computes the prompt once per group, not once per sample, with the
same log-probs and gradients as one row per sample, which remains the path with ``share_prompt`` off.

Log-probs never materialise full-vocabulary logits for the batch: only the hidden states that predict
response tokens go through the vocabulary projection, ``logprob_chunk_tokens`` at a time
(:func:`prorl_async.algo.loss.token_logprobs`).

Several ranks (``torch.distributed`` initialised by the caller, world size > 1): the policy and the
reference are sharded with FSDP2 ``fully_shard``; every rank is given the same whole batch and trains on
its share of the rows (whole units, balanced by tokens); the loss is normalised by the whole mini-batch's count,
so the update equals the one-rank update. Ranks run the same number of micro-batches (fillers with
weight 0 keep the collectives in step).

Usage::

    learner = Learner(cfg)
    metrics = learner.train_step(build_batch(groups))   # groups: list[TrajectoryGroup]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": learner.weights()})
    learner.observe_validation(0.42)            # feeds the plateau trigger
    learner.save_checkpoint("runs/x/ckpt")
    learner = Learner.load_checkpoint("runs/x/ckpt", cfg)
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from prorl_async.algo import native as _native
from prorl_async.algo.advantage import group_advantage
from prorl_async.algo.loss import (
    MEAN_KEYS,
    SUM_KEYS,
    merge_stats,
    prorl_loss,
    stats_from_sums,
    stats_to_sums,
    token_logprobs,
)
from prorl_async.errors import UserError
from prorl_async.learner.checkpoint import full_tensor as _full
from prorl_async.learner.packing import (
    MicroBatch,
    Unit,
    additive_mask,
    collate,
    collate_packed,
    packing_supported,
    plan_packed,
    plan_units,
)
from prorl_async.learner.phases import PhaseTimes
from prorl_async.learner.reset import ResetPolicy
from prorl_async.learner.staleness import token_staleness

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.learner.batch import GroupBatch


@dataclass
class StepMetrics:
    """What one ``train_step`` did. Loss terms and token stats cover every mini-batch of the step."""

    version: int
    """Policy version after the step: trainer steps (batches) taken so far."""
    optimizer_step: int
    """AdamW updates taken so far (``learner.mini_batches`` per trainer step)."""
    loss: float
    pg_loss: float
    kl_loss: float
    kl: float
    """Mean k3 KL to the reference over response tokens."""
    kl_share: float
    """The KL term's share of the update: sum|d kl_loss/d logp| / (sum|d pg_loss/d logp| + sum|d kl_loss/d logp|)
    over response tokens, in [0, 1] (not a ratio of loss values)."""
    entropy: float
    clip_frac_low: float
    clip_frac_high: float
    is_truncated_frac: float
    """Fraction of tokens whose importance weight was truncated (or dropped, ``decoupled``)."""
    ess: float
    """Effective sample size of the behaviour->proximal ratios, as a fraction of the tokens."""
    approx_kl: float
    """k3 estimate of KL(old || new), the proximal policy to the updated one."""
    grad_norm: float
    """Gradient norm before clipping (mean over the step's optimizer steps)."""
    lr: float
    tokens: float
    """Response tokens in the loss."""
    total_tokens: float
    """Prompt + response tokens of every sample (a shared prompt counts once per sample, as in the data)."""
    forward_tokens: float
    """Tokens the policy's forward actually ran: with prefix sharing each group's prompt once (per row)."""
    samples: float
    reward_mean: float
    staleness_mean: float
    """Mean of (version before the step - policy version) over response tokens."""
    staleness_max: float
    step_time_s: float
    tokens_per_s: float
    """total_tokens / step_time_s."""
    reset: float
    """1.0 when the reference (and optimizer) were reset during or just before this step."""
    reset_reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogprobModel(nn.Module):
    """A causal LM whose forward returns the log-probs of response tokens only (the FSDP root module).

    Forward: ``input_ids`` (R, L), ``attention_mask`` (R, L), a (R, 1, L, L) bool block mask or None,
    ``gather`` (N,) flat indices into the (R * L) hidden states predicting each response token, ``targets``
    (N,), ``position_ids`` (R, L) or None -> (N,) log-probs and (N,) entropies (empty without
    ``with_entropy``). A prefix-shared micro-batch is still one call, so FSDP runs every module once.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int, temperature: float) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        gather: torch.Tensor,
        targets: torch.Tensor,
        with_entropy: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        body = getattr(self.lm, self.lm.base_model_prefix)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and \
                self.lm.config._attn_implementation == "eager":
            attention_mask = additive_mask(attention_mask, torch.float32)  # eager adds the mask to the scores
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather)  # (N, H)
        weight = self.lm.get_output_embeddings().weight  # (V, H)
        logp, entropy = token_logprobs(
            hidden, weight, targets, chunk_tokens=self.chunk_tokens, temperature=self.temperature,
            with_entropy=with_entropy,
        )
        return logp, (entropy if entropy is not None else logp.new_zeros(0))


def plan_micro_batches(lengths: Sequence[int], budget_tokens: int) -> list[list[int]]:
    """Row indices in micro-batches of at most ``budget_tokens`` padded tokens (rows x longest row).

    Longest first, so rows of a micro-batch have similar lengths; a sample longer than the budget goes
    alone. Deterministic (ties broken by index).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plans: list[list[int]] = []
    for i in order:
        if plans and lengths[plans[-1][0]] * (len(plans[-1]) + 1) <= budget_tokens:
            plans[-1].append(i)
        else:
            plans.append([i])
    return plans


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


class Learner:
    """Holds the policy, the frozen reference (absent when ``kl_beta == 0``) and AdamW; see the module doc."""

    def __init__(self, cfg: Config, *, policy_dir: Path | None = None, reference_dir: Path | None = None) -> None:
        from prorl_async.models import resolve_model

        self.cfg = cfg
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.device = _pick_device(cfg.learner.device)
        if cfg.learner.attention == "flex_attention" and self.device.type != "cuda":
            raise UserError("learner.attention = 'flex_attention' trains on CUDA only (PyTorch has no FlexAttention "
                            "backward on a CPU): use 'sdpa' there")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.learner.num_threads or max(1, available_cores() // self.world))
        torch.manual_seed(cfg.run.seed)
        _native.configure(cfg.learner.ops)  # the advantage/KL dispatchers read it (process-wide)
        self.model_dir = Path(policy_dir) if policy_dir is not None else resolve_model(cfg.model.name)
        autocast = cfg.learner.autocast
        self.autocast = autocast == "bfloat16" or (autocast == "auto" and self.device.type == "cuda")
        temperature = cfg.sampling.temperature if cfg.learner.temperature_scaled_logprobs else 1.0
        self.temperature = temperature if temperature > 0 else 1.0  # greedy sampling: no scaling

        self.policy = self._load(self.model_dir)
        self.policy.lm.train()  # dropout is zeroed in _load; train() keeps gradient checkpointing active
        if cfg.learner.gradient_checkpointing:
            self.policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference: LogprobModel | None = None
        if cfg.loss.kl_beta > 0:
            self.reference = self._load(Path(reference_dir) if reference_dir is not None else self.model_dir)
            self.reference.requires_grad_(False).eval()
        self.share_prompt = cfg.learner.share_prompt
        why = packing_supported(self.policy.lm.config)
        if cfg.learner.attention == "flex_attention" and why is not None:
            raise UserError(f"learner.attention = 'flex_attention' packs rows under a custom mask, but {why}")
        if self.share_prompt and why is not None:
            warnings.warn(f"learner.share_prompt is on but {why}: every sample gets its own row", stacklevel=2)
            self.share_prompt = False
        self.pack_rows: str | None = "block" if cfg.learner.attention == "flex_attention" else None
        """``"block"``: micro-batches are packed rows of whole units, no padding (:func:`collate_packed`), under
        FlexAttention's block mask, which makes them cheap. ``"dense"``: the same rows under a dense mask, which any
        attention takes (tests check the packing on a CPU with it). None: padded rows of one unit each."""
        if cfg.learner.tf32 and self.device.type == "cuda":
            _enable_tf32()
        if self.world > 1:
            self._fully_shard()
        o = cfg.optim
        fused = o.fused == "on" or (o.fused == "auto" and self.device.type == "cuda")
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused or None
        )
        self.reset_policy = ResetPolicy(cfg.reset)
        self.phases = PhaseTimes(self.device)
        """Seconds per phase of ``train_step``, when a bench turns it on (:mod:`prorl_async.learner.phases`)."""
        self.policy_version = 0  # trainer steps: +1 per train_step (see the module docstring)
        self.optimizer_step = 0  # AdamW updates: +mini_batches per train_step
        self._reset_since_last_step = ""

    # ----------------------------------------------------------------------------------------- public

    @property
    def vocab_size(self) -> int:
        """Rows of the policy's input embedding: every token id the learner trains on must be below it."""
        return int(self.policy.lm.get_input_embeddings().num_embeddings)

    def train_step(self, batch: GroupBatch) -> StepMetrics:
        """Train on ``batch`` (whole groups): ``learner.mini_batches`` optimizer steps, then maybe a reset."""
        start = time.perf_counter()
        version_before = self.policy_version
        with self.phases("prepare"):
            data = _Prepared(batch, self.cfg, self.device, self.share_prompt, self.phases, self.pack_rows)
        groups, n = batch.num_groups, batch.group_size
        splits = [g.tolist() for g in torch.arange(groups).tensor_split(min(self.cfg.learner.mini_batches, groups))]
        minis = [[g * n + j for g in gs for j in range(n)] for gs in splits]
        old = None
        if len(minis) > 1:
            with self.phases("proximal"):
                old = self._proximal_logprobs(data, minis)
        parts: list[dict[str, float]] = []
        grad_norms: list[float] = []
        for indices in minis:
            grad_norms.append(self._optimizer_step(data, indices, old, parts))
        stats = self._reduce_stats(parts)
        self.policy_version += 1

        reason = self.reset_policy.after_step(self.policy_version, stats["kl_share"])
        if reason is not None:
            self.reset_reference(reason)
        reset_reason, self._reset_since_last_step = self._reset_since_last_step, ""
        elapsed = time.perf_counter() - start
        lags = token_staleness(version_before, batch.policy_versions.to(torch.float64))  # (T,)
        total_tokens = float(sum(data.prompt_lens) + sum(data.resp_lens))
        return StepMetrics(
            version=self.policy_version,
            optimizer_step=self.optimizer_step,
            **{k: stats[k] for k in ("loss", "pg_loss", "kl_loss", "kl", "kl_share", "entropy", "clip_frac_low",
                                     "clip_frac_high", "is_truncated_frac", "ess", "approx_kl", "tokens")},
            grad_norm=sum(grad_norms) / len(grad_norms),
            lr=self._lr(self.optimizer_step - 1),
            total_tokens=total_tokens,
            forward_tokens=float(sum(u.length for u in data.units)),
            samples=float(batch.num_samples),
            reward_mean=float(data.rewards.mean()),
            staleness_mean=float(lags.mean()),
            staleness_max=float(lags.max()),
            step_time_s=elapsed,
            tokens_per_s=total_tokens / elapsed,
            reset=1.0 if reset_reason else 0.0,
            reset_reason=reset_reason,
        )

    def reset_reference(self, reason: str) -> None:
        """Hard reset: reference <- current policy, optimizer moments cleared (``reset_optimizer``)."""
        with torch.no_grad():
            if self.reference is not None:
                if self.world > 1:  # FSDP2 leaves a root's parameters gathered after a forward: shard both alike
                    _reshard(self.reference)
                    _reshard(self.policy)
                for ref_p, p in zip(self.reference.parameters(), self.policy.parameters(), strict=True):
                    ref_p.copy_(p)
        if self.cfg.reset.reset_optimizer:
            self.optimizer.state.clear()
        self.reset_policy.mark_reset(self.policy_version)
        self._reset_since_last_step = reason

    @torch.no_grad()
    def logprobs(self, batch: GroupBatch) -> list[torch.Tensor]:
        """Log-probs (float32, CPU) of each sample's response tokens under the current policy, no gradient."""
        data = _Prepared(batch, self.cfg, self.device, self.share_prompt, pack_rows=self.pack_rows)
        out: dict[int, torch.Tensor] = {}
        for mb in self._micro_batches(data, list(range(batch.num_samples)), shard=False):
            logp, _ = self._forward(self.policy, mb)
            out.update(zip(mb.rows, self._unpadded(logp.cpu(), mb), strict=True))
        return [out[i] for i in range(batch.num_samples)]

    def observe_validation(self, reward: float, step: int | None = None) -> None:
        """Feed a validation reward measured with the weights of version ``step`` (default: the current ones) to the
        plateau trigger."""
        self.reset_policy.observe_validation(self.policy_version if step is None else step, reward)

    def weights(self, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor) of every policy parameter, as vLLM's ``load_weights`` expects.

        A tied head appears under both names (``model.embed_tokens.weight`` and ``lm_head.weight``): vLLM's
        CPU build keeps a repacked copy of the head that ``reload_weights`` refreshes only when the head's
        own name is in the stream (without it, log-probs after a reload were off by ~0.2). The tensors are
        the live parameters, detached (gathered in full under FSDP, a collective every rank must join), or
        their copies in ``model.dtype`` when the master weights (``learner.master_dtype``) differ from it:
        don't modify them. ``copy``: never the live parameters (a cast or a gather is already a copy; the
        rest are cloned), for a snapshot that outlives the next step.
        """
        dtype = getattr(torch, self.cfg.model.dtype)
        named = list(self.policy.lm.named_parameters(remove_duplicate=False))
        repeated = {k for k, count in Counter(id(p) for _, p in named).items() if count > 1}
        tied: dict[int, torch.Tensor] = {}  # only what comes again under another name is kept
        for name, p in named:
            if id(p) in tied:
                yield name, tied[id(p)]
                continue
            live = p.detach()
            out = _full(live.to(dtype))  # cast before the gather: half the traffic for bf16 generators
            if copy and out.data_ptr() == live.data_ptr():
                out = out.clone()
            if id(p) in repeated:
                tied[id(p)] = out
            yield name, out

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write policy (HF layout), reference, optimizer, version and RNG states into ``directory``."""
        from prorl_async.learner.checkpoint import save_learner

        return save_learner(self, Path(directory))

    @classmethod
    def load_checkpoint(cls, directory: str | Path, cfg: Config) -> Learner:
        """A learner that continues exactly where ``save_checkpoint(directory)`` left off."""
        from prorl_async.learner.checkpoint import restore_learner_state

        directory = Path(directory)
        reference = directory / "reference"
        learner = cls(cfg, policy_dir=directory / "policy", reference_dir=reference if reference.is_dir() else None)
        restore_learner_state(learner, directory)
        return learner

    @classmethod
    def resume_or_new(cls, cfg: Config, resume_from: str | Path | None) -> Learner:
        """The learner checkpointed in ``resume_from``, or a new one when it is None."""
        return cls(cfg) if resume_from is None else cls.load_checkpoint(resume_from, cfg)

    # --------------------------------------------------------------------------------------- internals

    def _load(self, path: Path) -> LogprobModel:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.cfg.learner.master_dtype),
                                                  attn_implementation=self.cfg.learner.attention)
        for module in lm.modules():  # RL needs the same log-probs in every pass: no dropout anywhere
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
        return LogprobModel(lm, self.cfg.learner.logprob_chunk_tokens, self.temperature).to(self.device)

    def _fully_shard(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for model in (self.policy, self.reference):
            if model is None:
                continue
            for layer in getattr(model.lm, model.lm.base_model_prefix).layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)  # root: embeddings, final norm and the (tied) head

    def _lr(self, step: int) -> float:
        warmup = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _micro_batches(self, data: _Prepared, indices: list[int], shard: bool = True) -> list[MicroBatch]:
        """This rank's micro-batches for the samples ``indices`` (whole groups; all of them unless ``shard``).

        Rows are the batch's units (a prompt and its group's responses, or one sample), so a shared prompt
        counts once against the token budget. Under FSDP every rank runs as many micro-batches (weight-0
        fillers), so the collectives match.
        """
        wanted = set(indices)
        units = [u for u in data.units if u.samples[0] in wanted]
        local = _local_share(units, self.rank, self.world) if shard else units
        planner = plan_packed if data.packed else plan_micro_batches
        plans = planner([u.length for u in local], self.cfg.learner.micro_batch_tokens)
        micro = [data.collate([local[j] for j in plan]) for plan in plans]
        if self.world > 1 and shard:
            count = torch.tensor([len(micro)])
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            micro += [data.collate(units[:1], weight=0.0) for _ in range(int(count) - len(micro))]
        return micro

    def _proximal_logprobs(self, data: _Prepared, minis: list[list[int]]) -> dict[int, torch.Tensor]:
        """No-grad log-probs of this rank's samples under the weights before the step, per sample."""
        old: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for mb in self._micro_batches(data, [i for m in minis for i in m]):
                logp, _ = self._forward(self.policy, mb)
                old.update(zip(mb.rows, self._unpadded(logp, mb), strict=True))
        return old

    def _optimizer_step(
        self, data: _Prepared, indices: list[int], old: dict[int, torch.Tensor] | None, parts: list[dict]
    ) -> float:
        """One AdamW update on the samples ``indices`` (a mini-batch); appends the loss stats to ``parts``."""
        cfg = self.cfg
        if cfg.loss.aggregation == "token":
            denominator = float(sum(data.resp_lens[i] for i in indices))
        else:
            denominator = float(len(indices))
        self.optimizer.zero_grad(set_to_none=True)
        with self.phases("collate"):
            micro = self._micro_batches(data, indices)
        for mb in micro:
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad(), self.phases("reference"):
                    ref_logp, _ = self._forward(self.reference, mb)
            with self.phases("policy_forward"):
                logp, entropy = self._forward(self.policy, mb, with_entropy=True)
            if old is None or not mb.weight:  # one mini-batch: the proximal policy is these very weights
                old_logp = logp.detach()
            else:
                old_logp = self._padded(torch.cat([old[i] for i in mb.rows]), mb)
            with self.phases("loss"):
                behav = self._padded(torch.cat([data.behav[i] for i in mb.rows]), mb)
                loss, stats = prorl_loss(
                    logp, old_logp, behav, ref_logp, data.advantages[mb.rows], mb.resp_mask, cfg.loss,
                    entropy=entropy, denominator=denominator,
                )
            # FSDP averages gradients over ranks; the loss is already normalised by the global count.
            with self.phases("backward"):
                (loss * (mb.weight * self.world)).backward()
            if mb.weight:
                parts.append(stats)
        with self.phases("optimizer"):
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.grad_clip))
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(self.optimizer_step)
            self.optimizer.step()
        self.optimizer_step += 1
        return float(grad_norm)

    def _forward(
        self, model: LogprobModel, mb: MicroBatch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, Tr) log-probs of a micro-batch's responses, and their entropies ``with_entropy``."""
        with self._autocast():
            logp, entropy = model(mb.input_ids, mb.attention_mask, mb.gather, mb.targets, with_entropy, mb.position_ids)
        return self._padded(logp, mb), (self._padded(entropy, mb) if with_entropy else None)

    @staticmethod
    def _padded(flat: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """(N,) values in response order -> (R, Tr) with zeros at padding (differentiable)."""
        return flat.new_zeros(mb.resp_mask.shape).masked_scatter(mb.resp_mask, flat)

    @staticmethod
    def _unpadded(padded: torch.Tensor, mb: MicroBatch) -> list[torch.Tensor]:
        """(R, Tr) -> one (n_r,) tensor per row: the inverse of :meth:`_padded`."""
        return list(padded[mb.resp_mask.to(padded.device)].split(mb.resp_mask.sum(1).tolist()))

    def _reduce_stats(self, parts: list[dict[str, float]]) -> dict[str, float]:
        """The step's loss stats over every micro-batch of every rank."""
        sums = stats_to_sums(merge_stats(parts)) if parts else [0.0] * (len(SUM_KEYS) + len(MEAN_KEYS))
        if self.world > 1:
            vector = torch.tensor(sums, dtype=torch.float64)
            dist.all_reduce(vector)
            sums = vector.tolist()
        return stats_from_sums(sums)


class _Prepared:
    """A batch ready for the passes: per-sample views, behaviour log-probs on the device, advantages, and units.

    ``units`` (:func:`prorl_async.learner.packing.plan_units`) cover every sample once, group by group: a
    group's prompt with its responses when ``share_prompt``, else one sample each.
    """

    def __init__(self, batch: GroupBatch, cfg: Config, device: torch.device, share_prompt: bool,
                 phases: PhaseTimes | None = None, pack_rows: str | None = None) -> None:
        self.device = device
        n = batch.group_size
        group_prompts = batch.prompts()
        self.prompts = [group_prompts[i // n] for i in range(batch.num_samples)]  # sample i -> its group's prompt
        self.responses = batch.responses()
        self.prompt_lens = [len(p) for p in self.prompts]
        self.resp_lens = batch.response_lens.reshape(-1).tolist()
        self.behav = list(batch.behaviour_logprobs.to(device).split(self.resp_lens))
        # (G * n,) float32, the advantages' input the loss tests pin (group_advantage computes in float64 anyway)
        self.rewards = batch.rewards.reshape(-1).to(torch.float32)
        loss = cfg.loss
        with (phases or PhaseTimes(device))("advantage"):
            adv = group_advantage(self.rewards, n, loss.advantage_eps, loss.advantage_std_normalize)
            self.advantages = adv.to(device)
        self.units = plan_units(batch.prompt_lens.tolist(), self.resp_lens, share=share_prompt,
                                budget_tokens=cfg.learner.micro_batch_tokens)
        self.pack_rows = pack_rows
        """None: padded rows of one unit each; ``"block"`` / ``"dense"``: packed rows under a FlexAttention block
        mask / a dense bool mask (see ``Learner.pack_rows``)."""

    @property
    def packed(self) -> bool:
        return self.pack_rows is not None

    def collate(self, units: list[Unit], weight: float = 1.0) -> MicroBatch:
        if self.pack_rows is not None:
            block = self.pack_rows == "block"
            return collate_packed(units, self.prompts, self.responses, self.device, weight, block=block)
        return collate(units, self.prompts, self.responses, self.device, weight)


def _reshard(model: nn.Module) -> None:
    """Every FSDP2 module of ``model`` back to sharded parameters (DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local_share(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """This rank's units: longest first to the least-loaded rank (same answer on every rank), in input order."""
    if world == 1:
        return units
    load = [0] * world
    mine: set[int] = set()
    for k in sorted(range(len(units)), key=lambda k: (-units[k].length, k)):
        r = min(range(world), key=lambda j: (load[j], j))
        load[r] += units[k].length
        if r == rank:
            mine.add(k)
    return [u for k, u in enumerate(units) if k in mine]


def _enable_tf32() -> None:
    """float32 matrix products on TF32 tensor cores, process-wide (``learner.tf32``)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)

