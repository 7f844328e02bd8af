"""Run configuration: pydantic v2 models loaded from TOML, with ``--set section.key=value`` overrides.

Invariants:
- every model forbids unknown keys, so a typo is an error, never a silently ignored knob;
- units live in field names (``timeout_s``, ``bucket_mb``, ``max_staleness`` in versions);
- cross-field checks live in one place, :meth:`Config._check_cross_fields`;
- any problem with a file or an override surfaces as one :class:`ConfigError` whose message is a
  single line naming the file, the key and what is allowed (the CLI prints it and exits 2).

Usage::

    cfg = load_config("configs/tiny.toml", overrides=["learner.lr=1e-5"])
    write_resolved(cfg, run_dir)  # run_dir/config.toml, loadable again with load_config
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from prorl_async.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; ``str(err)`` is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    run_dir: str = "runs/{timestamp}"
    """Directory for metrics, logs, checkpoints and the resolved config; ``{timestamp}`` is expanded."""
    seed: int = 0
    """Seed for prompt sampling, model initialisation and sampling."""
    max_steps: int = Field(100, ge=0)
    """Trainer steps (policy versions) to run: one step trains on one batch of ``learner.batch_groups`` groups,
    whatever ``learner.mini_batches`` is; 0 means no limit (stop on time budget or Ctrl-C)."""
    time_budget_s: float = Field(0.0, ge=0)
    """Wall-clock budget of the whole run in seconds, counted across resumes (the training time before a resume
    counts against it); 0 means no limit."""
    checkpoint_every_steps: int = Field(50, ge=0)
    """Write a checkpoint every this many trainer steps (policy versions), and always at shutdown; 0 only at
    shutdown."""
    log_every_s: float = Field(10.0, gt=0)
    """Period of plain log lines when stdout is not a terminal."""
    tui: Literal["auto", "on", "off"] = "auto"
    """Live rich TUI: ``auto`` shows it only on a terminal."""


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"
    """A built-in model name (``smollm2-135m-instruct``, ``tiny-random``) or a local Hugging Face directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the generators sample in, and that the learner sends them its weights in (the learner's own parameters
    are ``learner.master_dtype``)."""
    max_model_len: int = Field(1024, ge=16)
    """Longest prompt + response the generators accept, in tokens."""


class DataSourceConfig(_Section):
    """Rows of the user's own data set as a task spec's problems (``prorl_async.envs.data``)."""

    path: str
    """A local file (``.jsonl``/``.json``, ``.parquet``, ``.csv``) or directory: a Hugging Face data set saved with
    ``save_to_disk``, or a local data set repository holding data files. Relative to the working directory."""
    format: Literal["auto", "json", "parquet", "csv", "hf", "verifiers"] = "auto"
    """How to read ``path``; ``auto`` goes by its suffix (a directory: ``hf``). ``verifiers``: ``path`` is the id of an
    installed `verifiers` taskset, its tasks the rows and its rewards the reward (``prorl_async.envs.verifiers_source``;
    single-turn tasks)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """``format = "verifiers"``: the taskset's config fields (what ``--env.taskset.*`` sets in verifiers)."""
    split: str = "train"
    """The split to read where ``path`` holds several (a DatasetDict, a repository with split files)."""
    prompt: str = "auto"
    """Column with the prompt: a string (one user message) or a chat ``messages`` list (role/content maps), used as
    it is. ``auto``: ``prompt``, else ``messages``, ``question``, ``problem``, ``instruction`` (the first present).
    A dotted name reaches into a nested column (``extra_info.question``)."""
    answer: str = "auto"
    """Column with the reference answer the built-in verifier checks (dotted for nested). ``auto``:
    ``reward_model.ground_truth`` (verl's schema), else ``answer``, ``solution``, ``label``, ``ground_truth``; empty:
    none (a reward function must then judge without one)."""
    validation_path: str = ""
    """A separate file or directory of held-out rows (same format and columns); empty: ``tasks.validation_size`` rows
    of ``path`` are held out, and no training row has the same prompt text as one of them."""
    validation_split: str = ""
    """The split of ``validation_path`` (or of ``path``) to hold out; empty: ``split``."""
    max_rows: int = Field(0, ge=0)
    """Read at most this many training rows (0: all)."""

    @model_validator(mode="after")
    def _names(self) -> DataSourceConfig:
        """A section-local check: the path and column names can name something (their existence is checked when the
        data is opened, ``prorl_async.envs.data.check``)."""
        if not self.path.strip():
            raise ValueError("path is empty: give a file or directory of rows")
        for key in ("prompt", "answer"):
            name = getattr(self, key)
            if (name or key == "prompt") and not all(part.strip() for part in name.split(".")):
                raise ValueError(f"{key} = {name!r} is not a column name (a dotted name reaches into a struct column; "
                                 f"{'auto: found by name' if key == 'prompt' else 'empty: no answer'})")
        return self


class TaskSpec(_Section):
    domain: Literal["logic", "math", "code", "stem", "instruction"] = "logic"
    """Reward domain that scores this task (for a ``source``: which built-in verifier checks its rows, unless
    ``reward`` names a function)."""
    name: str = "chain_sum"
    """Task within its domain: a reasoning-gym generator for ``logic`` and ``math`` (or ``champ`` for math),
    ``humaneval`` for ``code``, ``mmlu_stem`` for ``stem``, ``ifeval`` for ``instruction``. With a ``source``: the
    task's label in logs and metrics."""
    source: DataSourceConfig | None = None
    """The user's own data set (``[tasks.mix.source]``) instead of a built-in task."""
    reward: str = ""
    """A reward function for this spec's samples, ``package.module:function`` or ``path/to/file.py:function``,
    called as ``fn(completion, **row)`` in the scoring pool (``prorl_async.envs.rewards``); empty: the domain's
    built-in verifier."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight in the task mix."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Task-specific settings (difficulty, sizes), passed to the task's generator."""
    partial_credit: bool = False
    """Keep fractional rewards (reasoning-gym's partial scores, IFEval's share of instructions followed);
    false gives 1 only to a fully correct answer."""
    curriculum: Literal["auto", "on", "off"] = "auto"
    """Difficulty levels for this task (``tasks.curriculum``): ``auto`` follows ``tasks.curriculum.enabled``, ``on``
    and ``off`` override it. A task with neither a reasoning-gym curriculum nor ``levels`` has none (logged once)."""
    levels: list[dict[str, Any]] = Field(default_factory=list)
    """Curriculum levels above 0, procedural tasks only: level k trains with ``params`` updated by ``levels[k - 1]``
    (each over ``params``, not over the level before). Empty: the levels of reasoning-gym's curriculum, if any."""

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, data: Any) -> Any:
        """A data source's spec that names no ``domain`` is scored as ``math`` (answer equivalence, what a prompt +
        reference answer data set such as verl's asks), and one without a ``name`` is labelled by its file (the
        built-in defaults, ``logic/chain_sum``, name a generator the rows have nothing to do with)."""
        if not isinstance(data, dict) or data.get("source") is None:
            return data
        source = data["source"]
        path = source.get("path") if isinstance(source, dict) else getattr(source, "path", None)
        defaults = {"domain": "math", "name": _source_label(path) if isinstance(path, str) else "data"}
        fmt = source.get("format") if isinstance(source, dict) else getattr(source, "format", None)
        if fmt == "verifiers":  # the taskset scores its own tasks, and its id is its name
            from prorl_async.envs.verifiers_source import REWARD

            defaults |= {"reward": REWARD, "name": str(path)}
        return {**defaults, **data}

    @model_validator(mode="after")
    def _source_spec(self) -> TaskSpec:
        """A section-local check: what a data source cannot have (no curriculum; ``logic`` cannot score rows)."""
        if self.source is None:
            return self
        if self.levels:
            raise ValueError("levels: a data source has no curriculum levels (its rows are what they are); remove them")
        if self.curriculum == "on":
            raise ValueError('curriculum = "on": a data source has no curriculum levels; remove it')
        if self.domain == "logic" and not self.reward:
            raise ValueError("domain = 'logic' cannot score a data source's rows (reasoning-gym's verifier needs its "
                             "generator); set reward = 'module:function', or domain = math, stem, code or instruction")
        return self

    @model_serializer(mode="wrap")
    def _without_source(self, handler: Any) -> Any:
        """No ``source`` key for a built-in task: TOML has no null, and the resolved config must load again."""
        data = handler(self)
        if isinstance(data, dict) and data.get("source", ...) is None:
            del data["source"]
        return data


def _source_label(path: str) -> str:
    """A data source's default task name: its file's stem; the directory's name for a directory or a file named
    for its split (``gsm8k/train.parquet``: ``gsm8k``)."""
    where = Path(path)
    split_named = where.suffix and where.stem.lower() in ("train", "test", "validation", "val", "dev", "data")
    if split_named and where.parent.name:
        return where.parent.name
    return where.stem or "data"


class CurriculumConfig(_Section):
    enabled: bool = True
    """Move each procedural task's difficulty with the policy (``prorl_async.envs.curriculum``): it trains at level 0
    (its own ``params``), one level up when its groups pass too often, down when too rarely. Validation always uses
    level 0. A run whose pass rate stays under ``promote_above`` trains exactly as without a curriculum."""
    window_groups: int = Field(16, ge=1)
    """Groups that arrived at a task's current level (every requested one, the variance filter's drops included)
    whose mean pass rate decides a move; the window starts empty after each move."""
    promote_above: float = Field(0.75, ge=0, le=1)
    """One level up when the window's mean pass rate (the mean reward of its groups) is above this."""
    demote_below: float = Field(0.25, ge=0, le=1)
    """One level down (not below 0) when the window's mean pass rate is below this. With the default 0.25 / 0.75, a
    group of 8 samples is informative with probability 1 - p^8 - (1-p)^8 >= 0.9 inside the band."""
    max_levels: int = Field(8, ge=1)
    """Levels per task taken from reasoning-gym's curriculum, level 0 included (a spec's own ``levels`` are all
    used)."""

    @model_validator(mode="after")
    def _band(self) -> CurriculumConfig:
        """A section-local check (it involves nothing outside this section)."""
        if self.demote_below >= self.promote_above:
            raise ValueError(f"demote_below ({self.demote_below}) must be below promote_above ({self.promote_above})")
        return self


class PromptSkipConfig(_Section):
    enabled: bool = True
    """Pass over, before sampling it, a prompt whose last groups all had equal rewards (all correct or all wrong),
    with a probability ``min(max_probability, 1 - 0.5^n)`` after n such visits in a row; tasks without a curriculum
    only (``prorl_async.learner.skips``, after GRESO). Deterministic; a passed-over prompt comes back next epoch."""
    max_probability: float = Field(0.9, ge=0, lt=1)
    """Cap of the skip probability: every prompt is still tried at least once in 1 / (1 - cap) epochs, in case the
    policy has moved on."""
    max_per_draw: int = Field(32, ge=1)
    """Prompts passed over in a row at most; the next one is handed out anyway, so a solved data set still trains."""


class TaskBalanceConfig(_Section):
    enabled: bool = True
    """Draw each task of the mix by its ``weight`` times the share of its recent groups that were informative
    (rewards not all equal), with a floor (``prorl_async.learner.balance``, after SEC). It never changes a task's
    difficulty and never drops a task; with one task in the mix it does nothing."""
    window_groups: int = Field(32, ge=1)
    """Latest groups per task (every requested one, the variance filter's drops included) whose informative share,
    estimated as (informative + 1) / (groups + 2), scales that task's weight."""
    min_share: float = Field(0.25, ge=0, le=1)
    """Floor of a task's drawing share, as a fraction of its configured share (weight / sum of weights): 0.25 keeps
    a task configured at half the mix at no less than an eighth of it, so no task starves; 1 is the configured
    shares, unchanged."""


class TasksConfig(_Section):
    mix: list[TaskSpec] = Field(default_factory=lambda: [TaskSpec()])
    """Tasks to train on, sampled by weight."""
    seed: int = 0
    """Seed of the task generators; the same seed gives the same prompts."""
    train_size: int = Field(10_000, ge=1)
    """Prompts per task in the training split."""
    validation_size: int = Field(64, ge=0)
    """Held-out prompts per task that training never draws from."""
    system_prompt: str = ""
    """System message put before every prompt (empty: none)."""
    answer_format: Literal["answer_tag", "boxed"] = "answer_tag"
    """How the model is asked to state its final answer: ``<answer>...</answer>`` or ``\\boxed{...}``."""
    prefill: str = ""
    """Text that starts the assistant turn (for example ``<answer>``) to steer a weak model."""
    few_shot: int = Field(0, ge=0, le=16)
    """Worked examples (question, answer in the asked format) from the task's own training split, put before
    the question as earlier chat turns; a small model learns the answer format from them."""
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    """Difficulty levels that follow the policy's pass rate, for procedural tasks (``[tasks.curriculum]``)."""
    skip: PromptSkipConfig = Field(default_factory=PromptSkipConfig)
    """Passing over prompts whose groups keep coming back uninformative, for tasks without a curriculum
    (``[tasks.skip]``)."""
    balance: TaskBalanceConfig = Field(default_factory=TaskBalanceConfig)
    """Drawing tasks by how informative their groups are (``[tasks.balance]``)."""


class SamplingConfig(_Section):
    group_size: int = Field(16, ge=1)
    """Samples per prompt (n); a group is the unit of advantage, filtering and transport."""
    temperature: float = Field(1.2, ge=0)
    """Sampling temperature of training rollouts (ProRL: 1.2)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass of training rollouts; must be 1.0 (see :meth:`_full_distribution`)."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling of training rollouts; must be -1 or 0, both of which disable it (see
    :meth:`_full_distribution`)."""
    max_response_tokens: int = Field(256, ge=1)
    """Longest response, in tokens."""
    stop: list[str] = Field(default_factory=list)
    """Extra stop strings (the tokenizer's EOS always stops)."""

    @field_validator("top_p", "top_k")
    @classmethod
    def _full_distribution(cls, value: float, info: ValidationInfo) -> float:
        """Training samples from the full distribution: vLLM renormalises its log-probs after top-p / top-k
        filtering while the learner's log-probs are of the full softmax, so the importance weights would be
        biased. Refused until the learner applies the same filter; ``eval.top_p`` / ``eval.top_k`` stay free."""
        truncates = value < 1 if info.field_name == "top_p" else value > 0
        if truncates:
            allowed = "top_p = 1.0" if info.field_name == "top_p" else "top_k = -1 or 0"
            raise ValueError(f"training needs {allowed}: vLLM renormalises its log-probs after filtering but the "
                             "learner uses the full softmax, which biases the importance weights "
                             "(eval.top_p / eval.top_k may filter)")
        return value


class GeneratorConfig(_Section):
    num_generators: int = Field(1, ge=1)
    """Generator processes, each with its own vLLM engine."""
    max_inflight_groups: int = Field(8, ge=1)
    """Prompts a generator keeps in its engine at once (continuous batching)."""
    max_num_seqs: int = Field(0, ge=0)
    """Sequences the vLLM engine runs at once; 0: ``max_inflight_groups`` x ``sampling.group_size``, so that every
    training sample the generator admits runs at once, and never fewer than vLLM's own default for an engine
    (128; its offline ``LLM`` gets 256 on CPU)."""
    kv_cache_gib: int = Field(1, ge=1)
    """KV-cache size per engine on CPU in whole GiB (VLLM_CPU_KVCACHE_SPACE takes an integer); unset, vLLM
    takes ~14 GiB."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Fraction of GPU memory a vLLM engine may use (GPU only)."""
    enforce_eager: bool = True
    """Disable CUDA graphs / compilation in vLLM (faster start, needed on CPU)."""
    reward_timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit for scoring one sample; a timeout scores 0 with a reason."""
    reward_workers: int = Field(1, ge=1)
    """Processes in each generator's scoring pool."""
    start_timeout_s: float = Field(600.0, gt=0)
    """How long the learner waits for every generator to join the weight group before its first step; past it,
    training starts with those that joined (late ones join at the next update)."""
    heartbeat_s: float = Field(2.0, gt=0)
    """Period of heartbeats and per-generator metrics."""
    admission_groups: int = Field(0, ge=0)
    """Groups this generator may have started for still-usable versions (DESIGN.md section 4); 0 splits the
    learner's (max_staleness + 1) x batch_groups evenly over the generators."""
    reward_function: str = ""
    """``module:function`` called as ``fn(text, task_dict) -> reward | (reward, reason)`` in the scoring pool;
    empty uses the built-in verifiers (``prorl_async.envs.score.score``)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one vLLM engine spans (vLLM's ``tensor_parallel_size``); the Ray launcher keeps them on one node."""


class BufferConfig(_Section):
    max_staleness: Annotated[int, Field(ge=0)] | Literal["auto"] = 1
    """Largest learner_version - policy_version a consumed token may have, in policy versions (trainer steps);
    0 is synchronous on-policy. ``"auto"``: the learner picks it each trainer step between 1 and
    ``auto_max_staleness`` — the smallest bound that keeps both sides busy (``learner.staleness.AutoStaleness``) —
    and sends it to the generators with every WeightsReady."""
    auto_max_staleness: int = Field(4, ge=1)
    """``max_staleness = "auto"``: the largest bound it may pick; groups up to this stale are still trained on."""
    auto_idle_gap: float = Field(0.1, gt=0, lt=1)
    """``max_staleness = "auto"``: the bound rises after a trainer step in which the learner waited and the
    generators idled each for more than this fraction of the step's cycle."""
    auto_patience: int = Field(3, ge=1)
    """``max_staleness = "auto"``: the bound falls by one after this many trainer steps (policy versions) in a row
    in which the learner waited less than half of ``auto_idle_gap`` of the cycle (the generators keep up with room
    to spare)."""
    variance_filter: bool = True
    """Dynamic sampling: drop groups whose rewards do not vary (they carry no signal). Off keeps every group,
    for pipeline tests and benches with a model that earns no reward."""
    min_reward_std: float = Field(1e-6, ge=0)
    """Variance filter: groups whose reward std is at or below this carry no signal and are dropped."""
    pull_timeout_s: float = Field(600.0, gt=0)
    """How long the learner waits for a full batch before reporting a starved buffer."""

    @property
    def auto(self) -> bool:
        return self.max_staleness == "auto"

    @property
    def ceiling(self) -> int:
        """The staleness the buffer accepts: the fixed bound, or the largest one ``auto`` may pick."""
        return self.auto_max_staleness if self.max_staleness == "auto" else self.max_staleness

    @property
    def initial_bound(self) -> int:
        """The admission bound before the learner announces one: the fixed bound, or 1 under ``auto``."""
        return 1 if self.max_staleness == "auto" else self.max_staleness


class LossConfig(_Section):
    eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip range of the ratio (1 - eps_low)."""
    eps_high: float = Field(0.4, ge=0)
    """Upper clip range of the ratio (1 + eps_high), decoupled "clip-higher"."""
    is_correction: Literal["none", "truncated", "decoupled"] = "truncated"
    """Off-policy correction between behaviour (vLLM) and proximal (learner) log-probs: ``none`` (w = 1),
    ``truncated`` (w = min(exp(old - behav), is_cap)) or ``decoupled`` (w = exp(old - behav), tokens above
    is_cap dropped from the loss)."""
    is_cap: float = Field(2.0, ge=1)
    """C of the importance weight: truncation point (``truncated``) or drop threshold (``decoupled``)."""
    kl_beta: float = Field(1e-4, ge=0)
    """Weight of the k3 KL penalty to the reference policy."""
    aggregation: Literal["token", "sequence"] = "token"
    """Token mean over the batch (DAPO) or mean of per-sequence means."""
    advantage_std_normalize: bool = True
    """GRPO advantages divide by the group's reward std."""
    advantage_eps: float = Field(1e-6, gt=0)
    """Added to the group std in the advantage denominator."""


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate after warm-up."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up over this many optimizer steps (AdamW updates: a batch makes ``learner.mini_batches`` of
    them), then a constant learning rate."""
    grad_clip: float = Field(1.0, gt=0)
    """Maximum global gradient norm."""
    fused: Literal["auto", "on", "off"] = "auto"
    """AdamW as one fused kernel over all parameters (torch's ``fused=True``); ``auto`` fuses on CUDA only, where it
    replaces a dozen kernel launches per parameter group with one pass; the CPU keeps the plain loop."""


class LearnerConfig(_Section):
    batch_groups: int = Field(8, ge=1)
    """Groups (prompts) per batch, i.e. per trainer step (policy version); samples per batch = batch_groups x
    group_size, split evenly over ``mini_batches`` optimizer steps."""
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps (AdamW updates) per batch; the policy version still advances once per batch (one trainer
    step, one weight broadcast). Above 1 the proximal log-probs come from a no-grad pass first. With 1 the
    proximal policy equals the current one, so the ratio is 1 and the 0.2/0.4 clip cannot bind: only the
    importance weight, truncated (or dropped) at ``loss.is_cap``, bounds the step (decoupled PPO as in AReaL)."""
    micro_batch_tokens: int = Field(4096, ge=16)
    """Token budget of one forward/backward micro-batch (gradient accumulation beyond it)."""
    share_prompt: bool = True
    """Run each group's prompt once per micro-batch row and its responses after it (prefix sharing).

    The n responses of a group attend to one copy of the prompt's activations through a block attention
    mask, so a GRPO step computes ``prompt + sum(responses)`` tokens per group instead of
    ``n x (prompt + response)``; the log-probs and gradients are the same. Groups whose samples do not
    share a prompt, and models whose attention cannot take a custom mask, take the unshared path anyway.
    Attention inside a row is dense (scores between sibling responses are computed, then masked): worth it
    when prompts are long next to responses (few-shot prompts, short answers); with long responses it saves
    little and costs attention, so turn it off there."""
    attention: Literal["sdpa", "flex_attention", "eager"] = "sdpa"
    """The models' attention kernels. ``sdpa``: PyTorch's scaled-dot-product attention (flash kernels on CUDA for
    rows without a mask); each micro-batch is rows padded to the longest, a shared prompt's row takes a dense mask.
    ``flex_attention``: a micro-batch is one packed row of whole units, no padding, under a block-sparse mask that
    skips the tiles no token may see (:mod:`prorl_async.learner.packing`); compiled by ``torch.compile`` on first
    use (seconds; on a CPU tens of seconds). ``eager``: the reference implementation, for tests."""
    tf32: bool = False
    """CUDA: float32 matrix products on TF32 tensor cores (10-bit mantissa inputs, float32 sums), process-wide.

    Under bf16 autocast the only float32 products left are the vocabulary projection of the log-probs (kept in
    float32 for the ratio's sake, ``prorl_async.algo.loss.token_logprobs``), which at fp32's speed can cost more
    than the layers (2 x 151,936 x 1,024 FLOPs a token for Qwen3-0.6B, a third of its forward). The cost in
    accuracy, emulated on a CPU by rounding SmolLM2-135M's hidden states and head to TF32: log-probs off by 4e-4
    nats on average and 6e-3 at most (bf16 inputs: 1.5e-3 and 3.5e-2). Without autocast it also covers every layer.
    No effect on a CPU."""
    logprob_chunk_tokens: int = Field(1024, ge=16)
    """Tokens per chunk of the vocabulary projection when computing log-probs."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``."""
    ops: Literal["auto", "native", "reference"] = "auto"
    """Advantage/KL ops: the native extension, the PyTorch reference, or native when it builds."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    """Mixed precision of forward/backward over fp32 master weights: ``auto`` is bf16 on CUDA, off on CPU."""
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the policy's and the reference's parameters and of AdamW's state, whatever ``model.dtype`` is.

    float32 unless memory forces otherwise: an AdamW update is about ``optim.lr`` per weight, and at ProRL's 2e-6
    that is far below bf16's resolution (~1e-4 for a weight of 0.02), so bf16 parameters lose almost every update
    (measured: 4% of the tiny model's weights moved in a step). bfloat16 halves the parameters' and AdamW's memory
    for runs whose updates are large enough to survive it. (No float16: AdamW's eps of 1e-8 is 0 there, and a zero
    gradient gives 0 / 0.)"""
    num_threads: int = Field(0, ge=0)
    """CPU threads of the learner's torch ops; 0 uses every core this process may run on."""
    temperature_scaled_logprobs: bool = True
    """Log-probs of softmax(logits / sampling.temperature), the distribution the generators sample from.

    The behaviour log-probs must then be of that same distribution (vLLM ``logprobs_mode="processed_logprobs"``);
    turn this off when the generators report raw-logit log-probs instead."""


class ResetConfig(_Section):
    interval_steps: int = Field(0, ge=0)
    """Hard-reset the reference policy and optimizer this many trainer steps (policy versions) after the last
    reset; 0 disables it."""
    kl_share_threshold: float = Field(0.0, ge=0)
    """Trigger a reset when the KL term's share of the update stays above this (mean over the window); 0 disables.
    The share is sum|d kl_loss/d logp| / (sum|d pg_loss/d logp| + sum|d kl_loss/d logp|) over the step's response
    tokens, in [0, 1]: both terms reach the weights only through the token log-probs, so it is KL's weight in the
    gradient (not a ratio of loss values, which is ~0 / ~0 for zero-mean group advantages)."""
    kl_window_steps: int = Field(20, ge=1)
    """Window of the KL-share trigger, in trainer steps (policy versions)."""
    val_patience_steps: int = Field(0, ge=0)
    """Trigger a reset when validation reward has not improved for this many trainer steps (policy versions);
    0 disables."""
    reset_optimizer: bool = True
    """Re-initialise the optimizer state on a reset (ProRL does)."""


class WeightSyncConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: ``auto`` picks NCCL for CUDA weights, gloo otherwise."""
    host: str = "127.0.0.1"
    """Address of the TCP store that forms the weight group (the learner's host)."""
    port: int = Field(0, ge=0, le=65535)
    """Port of the learner's TCP store that generators join through; 0 picks a free one (passed on to them)."""
    bucket_mb: float = Field(64.0, gt=0)
    """Target size of one flat broadcast bucket in MiB (a bigger tensor travels alone in its own bucket)."""
    timeout_s: float = Field(60.0, gt=0)
    """Timeout of the learner's waits (and of joining): a dead generator fails at once, a stuck one within this.
    Generators wait twice as long (the learner may spend one timeout on a stuck peer between two buckets)."""
    stream: bool = True
    """Load buckets into the engine as they arrive (fastest, two buckets of memory). False receives the whole
    update first, so that a learner failing mid-update leaves the engine's weights untouched."""
    sync_every_steps: int = Field(1, ge=1)
    """Broadcast weights every this many trainer steps (policy versions), not optimizer steps."""
    overlap: bool = True
    """With ``buffer.max_staleness`` >= 1, broadcast a snapshot of version v while step v + 1 trains (the learner
    waits for it only at the end of that step); false broadcasts synchronously after each step. Overlap pays where
    the broadcast runs beside the step (NCCL on a GPU); on a CPU learner both share the same cores (bench/README.md)."""


class TransportConfig(_Section):
    host: str = "127.0.0.1"
    """Interface the learner binds its sockets to; loopback unless a remote generator must connect."""
    groups_port: int = Field(0, ge=0, le=65535)
    """PULL port for trajectory groups; 0 picks a free one (or ipc is used when ``ipc_dir`` is set)."""
    control_port: int = Field(0, ge=0, le=65535)
    """PUB port for control messages (WeightsReady, Stop)."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Port for metrics messages; 0 picks a free one."""
    ipc_dir: str = ""
    """Use ipc:// endpoints in this directory instead of tcp (same machine only)."""
    high_water_mark: int = Field(1000, ge=1)
    """ZeroMQ send/receive high-water marks of the control and metrics sockets, in messages."""
    groups_high_water_mark: int = Field(4, ge=1)
    """High-water marks of the groups sockets, in groups per peer and side: small, so that a slow learner
    blocks the generators' sends (backpressure) before stale groups pile up in queues."""
    channel_size: int = Field(8, ge=1)
    """Messages a receive thread may hand to trio before it blocks: the bound of the thread-to-trio bridge."""
    handshake_timeout_s: float = Field(60.0, gt=0)
    """How long a generator waits for the learner's first control message (READY handshake)."""
    max_message_mb: float = Field(256.0, gt=0)
    """Largest accepted message; bigger frames are refused by ZeroMQ before they use memory."""
    linger_ms: int = Field(1000, ge=0)
    """How long a closing socket may flush pending messages."""
    curve_secret_key_file: str = ""
    """ZeroMQ CURVE key file of this side; with the peer's public key, enables authentication + encryption."""
    curve_server_public_key_file: str = ""
    """The learner's CURVE public key (generator side)."""
    curve_authorized_keys_dir: str = ""
    """Directory of generator public keys the learner accepts (learner side)."""


class EvalConfig(_Section):
    temperature: float = Field(0.6, ge=0)
    """Sampling temperature for evaluation (the paper: 0.6)."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus mass for evaluation (the paper: 0.95)."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling for evaluation; -1 disables it."""
    max_response_tokens: int = Field(0, ge=0)
    """Longest evaluated response, in tokens; 0 uses ``sampling.max_response_tokens``."""
    k: list[int] = Field(default_factory=lambda: [1, 16], min_length=1)
    """pass@k values to report."""
    samples: int = Field(16, ge=1)
    """Samples per prompt (n >= max k)."""
    prompts: int = Field(0, ge=0)
    """Held-out prompts per task for ``prorl-async eval`` (the first ones of the validation split); 0 takes all
    ``tasks.validation_size``."""
    tasks: list[str] = Field(default_factory=list)
    """Tasks ``prorl-async eval`` evaluates: ``name``, ``domain/name`` or ``domain`` of ``tasks.mix`` entries (a
    ``domain/name`` not in the mix is evaluated with default params); empty: every task of the mix."""
    correct_threshold: float = Field(1.0, gt=0, le=1)
    """A sample counts as correct for pass@k when its reward is at least this (1: partial credit never solves)."""
    reward_workers: int = Field(0, ge=0)
    """Scoring processes of ``prorl-async eval``; 0 uses one per CPU core (at most 8)."""
    out_dir: str = "runs/eval-{model}-{timestamp}"
    """Output directory of ``prorl-async eval`` (``{model}`` and ``{timestamp}`` are expanded)."""
    every_steps: int = Field(0, ge=0)
    """Validate on the held-out split during training after each trainer step whose version (policy version) is a
    multiple of this; 0: not by steps. With ``every_minutes`` whichever comes first; both 0 disable validation."""
    every_minutes: float = Field(0.0, ge=0)
    """Also validate after a step once this many minutes of wall time passed since the last request; 0: not by
    time. One round is in flight at a time: a round due meanwhile waits for the next step after it ends."""
    at_start: bool = False
    """When validation is on (``every_steps`` or ``every_minutes``): validate the weights the learner starts with
    (the base model, or the resumed checkpoint) while the first batch is gathered, as the baseline."""


class ClusterConfig(_Section):
    """Where the processes run: on this machine (``local``) or on a Ray cluster (``ray``; ``pip install
    prorl-async[ray]``). The processes, the ZeroMQ data plane and the weight groups are the same either way."""

    launcher: Literal["local", "ray"] = "local"
    """``local``: every process on this machine. ``ray``: each process inside a Ray actor placed by a placement group
    (``prorl_async.supervisor.ray_launcher``)."""
    address: str = "auto"
    """The Ray cluster to join: ``auto`` joins the one this machine belongs to (``RAY_ADDRESS``, ``ray start``) and
    starts one on this machine when there is none; ``local`` always starts one here; else ``HOST:PORT``."""
    learner_nodes: int = Field(1, ge=1)
    """Nodes the learner's ranks span (one placement-group bundle per node)."""
    learner_gpus_per_node: int = Field(0, ge=0)
    """GPUs per learner node, one rank each; 0: the learner runs on CPU."""
    learner_ranks_per_node: int = Field(0, ge=0)
    """Learner ranks (processes) per node: 0 means one per GPU, or one on CPU. More than one CPU rank shards the
    model over gloo (memory per rank, not speed: the ranks share the node's cores). With GPUs it must be 0 or equal
    ``learner_gpus_per_node``. Several ranks in all: FSDP2 (``prorl_async.learner.ranks``)."""
    learner_cpus: float = Field(1.0, gt=0)
    """Ray CPUs reserved per learner rank (a scheduling unit, not a limit on threads)."""
    learner_resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources per learner node, e.g. ``{learner_node = 1}`` to pin the ranks to nodes started with
    them (shared by the node's ranks)."""
    generator_cpus: float = Field(1.0, gt=0)
    """Ray CPUs reserved per generator engine."""
    generator_resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources per generator engine."""
    generator_gpus: bool = False
    """Generator engines on GPUs: each reserves ``generator.tensor_parallel_size`` GPUs of one node."""
    interface: str = ""
    """The address the learner listens on when processes span machines; empty: its node's address as Ray sees it.
    On one machine the learner keeps ``transport.host`` (loopback)."""
    curve: Literal["auto", "on", "off"] = "auto"
    """ZeroMQ CURVE with keys made for this run and handed to the processes through Ray: ``auto`` turns it on when the
    learner listens on anything but loopback. ``off`` across machines is refused."""
    generator_max_restarts: int = Field(-1, ge=-1)
    """How often Ray itself restarts a generator's actor after its node dies (on a node that can hold it); -1: always.
    Past that, the supervisor places a new actor after its back-off: a generator is never given up."""
    placement_timeout_s: float = Field(300.0, gt=0)
    """How long to wait for the cluster to place a process (resources free up, nodes join) before giving up."""
    call_timeout_s: float = Field(60.0, gt=0)
    """Longest wait on any one call to a remote actor; past it the actor counts as lost."""

    @property
    def ranks_per_node(self) -> int:
        """Learner ranks on each learner node."""
        return self.learner_ranks_per_node or max(1, self.learner_gpus_per_node)

    @property
    def learner_ranks(self) -> int:
        """Learner ranks in all (the FSDP world size)."""
        return self.learner_nodes * self.ranks_per_node


class TrackingConfig(_Section):
    """Experiment trackers that receive the run's records next to ``metrics.jsonl`` (``prorl_async.monitor``)."""

    wandb: bool = False
    """Log to Weights & Biases (``pip install prorl-async[wandb]``): the resolved config once, every numeric field of
    the step, validation and generator records under the names ``metrics.jsonl`` uses, against ``version`` (the x
    axis of every series). A resumed run continues the same W&B run. ``WANDB_MODE=offline`` keeps it on disk."""
    wandb_project: str = "prorl-async"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (team or user); empty: the logged-in default."""
    wandb_name: str = ""
    """W&B run name; empty: the run directory's name."""
    wandb_tags: list[str] = Field(default_factory=list)
    """W&B run tags."""


class Config(_Section):
    """The whole run. Sections mirror the processes and modules that read them."""

    run: RunConfig = Field(default_factory=RunConfig)
    """Run directory, length, seed, checkpoints."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Which model the learner trains and the generators serve."""
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    """Task mix, splits and prompt format."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Rollout sampling."""
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    """Generator processes."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """Replay buffer: staleness bound and variance filter."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """The ProRL loss."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """AdamW."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """Batching and devices of the learner."""
    reset: ResetConfig = Field(default_factory=ResetConfig)
    """Reference-policy resets."""
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    """Weight broadcast to the generators."""
    transport: TransportConfig = Field(default_factory=TransportConfig)
    """ZeroMQ sockets between processes."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation and periodic validation."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking (Weights & Biases)."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Where the processes run: this machine or a Ray cluster."""

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.sampling.group_size < 2 and self.loss.advantage_std_normalize:
            raise ValueError("sampling.group_size must be >= 2 for group advantages (got 1)")
        if self.eval.k and max(self.eval.k) > self.eval.samples:
            raise ValueError(f"eval.samples ({self.eval.samples}) must be >= the largest eval.k ({max(self.eval.k)})")
        if any(k < 1 for k in self.eval.k):
            raise ValueError("eval.k values must be >= 1")
        if self.learner.batch_groups % self.learner.mini_batches:
            raise ValueError(
                f"learner.batch_groups ({self.learner.batch_groups}) must be divisible by "
                f"learner.mini_batches ({self.learner.mini_batches})"
            )
        curve = self.transport
        if (curve.curve_server_public_key_file or curve.curve_authorized_keys_dir) and not curve.curve_secret_key_file:
            raise ValueError(
                "transport.curve_secret_key_file is required when transport.curve_server_public_key_file or "
                "transport.curve_authorized_keys_dir is set (CURVE needs this side's key pair)"
            )
        c = self.cluster
        if c.learner_gpus_per_node and c.learner_ranks_per_node not in (0, c.learner_gpus_per_node):
            raise ValueError(f"cluster.learner_ranks_per_node ({c.learner_ranks_per_node}) must be 0 or equal "
                             f"cluster.learner_gpus_per_node ({c.learner_gpus_per_node}): one rank per GPU")
        if c.launcher == "local" and c.learner_nodes > 1:
            raise ValueError(f"cluster.learner_nodes = {c.learner_nodes} needs cluster.launcher = \"ray\": the local "
                             "launcher starts every process on this machine")
        if self.model.max_model_len <= self.sampling.max_response_tokens:
            raise ValueError(
                f"model.max_model_len ({self.model.max_model_len}) must exceed "
                f"sampling.max_response_tokens ({self.sampling.max_response_tokens})"
            )
        return self


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the embedded default, ``configs/default.toml``) and apply ``overrides``."""
    source = Path(path) if path is not None else CONFIGS_DIR / "default.toml"
    data = _read(source, ())
    for item in overrides or []:
        _apply_override(data, item, source)
    return _validate(data, source)


def _read(source: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The TOML of ``source``; with a top-level ``extends = "base.toml"`` (relative to ``source``'s directory),
    ``source``'s tables merged over the base's, key by key (an array, like ``tasks.mix``, replaces the base's)."""
    try:
        data = tomllib.loads(source.read_text())
    except FileNotFoundError:
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"{source}: no such config file{where}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{source}: extends must be a file name (got {base!r})")
    base_path = (source.parent / base).resolve()
    if base_path in chain or base_path == source.resolve():
        raise ConfigError(f"{source}: extends {base} goes round in a circle")
    return _merge(_read(base_path, (*chain, source.resolve())), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        base[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def _apply_override(data: dict[str, Any], item: str, source: Path) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    """A TOML value (``3``, ``1e-5``, ``true``, ``[1, 2]``, ``"x"``); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _validate(data: dict[str, Any], source: Path) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err, data)}") from None


def _describe(err: ValidationError, data: dict[str, Any]) -> str:
    """One line for the first error: the dotted key, what is wrong, and what is allowed."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"unknown key '{key}' (allowed: {', '.join(allowed)})"
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    shown = _lookup(data, loc)
    got = f" (got {shown!r})" if shown is not _MISSING else ""
    return f"{key}: {msg}{got}"


_MISSING = object()


def _lookup(data: Any, loc: list[str]) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return _MISSING
    return data


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        nested = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            break
        model = nested
    return sorted(model.model_fields)


# --------------------------------------------------------------------------------------------- writing


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML text that :func:`load_config` reads back to an equal ``Config``."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(mode="json"))


def write_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``run_dir/config.toml`` with every field resolved (defaults included)."""
    path = Path(run_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg))
    return path
