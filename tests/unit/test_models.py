"""Built-in models: tiny-random is deterministic and well-formed; SmolLM2 converts with a distinct pad."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from prorl_async.errors import UserError
from prorl_async.models import build_tiny_tokenizer, resolve_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_random_is_deterministic(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PRORL_CACHE_DIR", str(tmp_path))
    again = resolve_model("tiny-random")
    assert again != tiny_model_dir
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(tiny_model_dir / name), name


def test_tiny_random_loads_and_chats(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text + "<answer>7</answer>")["input_ids"]
    assert tok.decode(ids) == text + "<answer>7</answer>"  # byte-level BPE round-trips
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_tiny_tokenizer_specials() -> None:
    tok = build_tiny_tokenizer()
    for special in ("<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_smollm2_has_distinct_pad_and_loads_fast(smollm2_dir: Path) -> None:
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id not in (None, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>"))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    elapsed = time.perf_counter() - t0
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")
    assert (smollm2_dir / "model.safetensors").is_file()
    print(f"smollm2 load from safetensors: {elapsed:.2f} s")


def test_unknown_model_names_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a built-in model"):
        resolve_model("gpt-17")
    with pytest.raises(UserError, match="not a built-in model"):
        resolve_model(str(tmp_path))  # a directory without config.json
