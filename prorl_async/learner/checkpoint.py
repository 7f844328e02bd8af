"""Learner checkpoints: a directory that resumes exactly and whose policy loads in transformers and vLLM as is.

Layout (everything safetensors or JSON; nothing is pickled)::

    DIR/policy/        config.json, generation_config.json, model.safetensors, tokenizer files:
                       a Hugging Face model directory (``LLM(model=DIR/"policy")``, ``from_pretrained``)
    DIR/reference/     the reference policy, same layout without the tokenizer (absent when kl_beta = 0)
    DIR/optimizer.safetensors   AdamW state per parameter: "<hf name>/<state key>" (exp_avg, exp_avg_sq, step)
    DIR/rng.safetensors         torch RNG states (CPU, and CUDA when present)
    DIR/learner.json            policy version, optimizer step, reset-policy state, Python/NumPy RNG states,
                                format (a checkpoint written before the two counters were separated holds one
                                ``version``: it counted optimizer steps, and it resumes with both set to it)

The learner writes into ``DIR`` (created if needed) and owns only these entries, so the orchestrator can
add its own (replay buffer, sampler position) and make the whole directory appear atomically by
writing it under a temporary name and renaming it. Optimizer hyper-parameters are not stored: they come
from the config, the learning rate from the optimizer step. Under FSDP every rank must call both functions
(tensors are gathered); rank 0 writes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from prorl_async.learner.trainer import Learner

FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")
_MODEL_FILES = {"config.json", "generation_config.json"}



def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered in full; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

def save_learner(learner: Learner, directory: Path) -> Path:
    """Write ``learner``'s checkpoint into ``directory`` and return it."""
    writer = learner.rank == 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    _save_hf(learner.policy.lm, directory / "policy", writer, tokenizer_from=learner.model_dir)
    if learner.reference is not None:
        _save_hf(learner.reference.lm, directory / "reference", writer)
    optimizer_state = _optimizer_tensors(learner)
    if writer:
        save_file(optimizer_state, directory / "optimizer.safetensors")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, directory / "rng.safetensors")
        meta = {
            "format": FORMAT,
            "policy_version": learner.policy_version,
            "optimizer_step": learner.optimizer_step,
            "reset_policy": learner.reset_policy.state_dict(),
            "python_rng": _jsonable(random.getstate()),
            "numpy_rng": _jsonable(np.random.get_state()),
        }
        (directory / "learner.json").write_text(json.dumps(meta, indent=1) + "\n")
    if learner.world > 1:
        dist.barrier()
    return directory


def restore_learner_state(learner: Learner, directory: Path) -> None:
    """Load version, optimizer, reset-policy and RNG states into a learner built from ``directory/policy``."""
    meta = json.loads((directory / "learner.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    if "policy_version" in meta:
        learner.policy_version, learner.optimizer_step = int(meta["policy_version"]), int(meta["optimizer_step"])
    else:  # written before the counters were separated: one "version" that counted optimizer steps
        learner.policy_version = learner.optimizer_step = int(meta["version"])
        meta["reset_policy"]["kl_shares"] = []  # kl_share then meant a ratio of loss values: start a new window
    learner.reset_policy.load_state_dict(meta["reset_policy"])
    _load_optimizer(learner, load_file(directory / "optimizer.safetensors"))
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_python_rng(meta["python_rng"]))
    np.random.set_state(_numpy_rng(meta["numpy_rng"]))


def _save_hf(lm: torch.nn.Module, out: Path, writer: bool, tokenizer_from: Path | None = None) -> None:
    """``lm`` as a Hugging Face directory: its config files and one safetensors file of its parameters."""
    # named_parameters lists a tied head once, under the embedding: exactly what save_pretrained writes.
    tensors = {name: full_tensor(p.detach()).contiguous().cpu() for name, p in lm.named_parameters()}
    if not writer:
        return
    out.mkdir(parents=True, exist_ok=True)
    lm.config.save_pretrained(out)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_from is not None:
        for src in Path(tokenizer_from).iterdir():  # tokenizer, chat template, special tokens
            skip = src.name.startswith(".") or src.name in _MODEL_FILES or src.name.endswith(_WEIGHT_SUFFIXES)
            if src.is_file() and not skip:
                shutil.copy2(src, out / src.name)


def _optimizer_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (gathered in full under FSDP), in parameter order."""
    out: dict[str, torch.Tensor] = {}
    for name, p in learner.policy.lm.named_parameters():
        for key, value in sorted(learner.optimizer.state.get(p, {}).items()):
            out[f"{name}/{key}"] = full_tensor(value).detach().contiguous().cpu()
    return out


def _load_optimizer(learner: Learner, tensors: dict[str, torch.Tensor]) -> None:
    """AdamW state back onto its parameters: moments in the parameter's dtype (a checkpoint of other master weights,
    say bf16 ones, resumes) and place; the step count on the CPU, or beside the parameter for the fused kernel,
    which reads it there (as torch's own ``Optimizer.load_state_dict`` arranges)."""
    learner.optimizer.state.clear()
    fused = any(group.get("fused") or group.get("capturable") for group in learner.optimizer.param_groups)
    for name, p in learner.policy.lm.named_parameters():
        state: dict[str, torch.Tensor] = {}
        for key in sorted(k.rpartition("/")[2] for k in tensors if k.rpartition("/")[0] == name):
            value = tensors[f"{name}/{key}"]
            if key == "step":
                value = value.to(p.device if fused else "cpu")
            elif hasattr(p, "device_mesh") and value.shape == p.shape:  # a DTensor parameter: shard like it
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.device_mesh.device_type, p.dtype), p.device_mesh, p.placements)
            else:
                value = value.to(p.device, p.dtype)
            state[key] = value
        if state:
            learner.optimizer.state[p] = state


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _python_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _numpy_rng(state: list) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached
