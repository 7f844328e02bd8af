"""The generator's validator reports the weight versions its samples were drawn under, not only the version it held
when the round started: weights that change mid-round (the learner keeps training) widen the recorded span."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from prorl_async.config import load_config
from prorl_async.envs.scoring_pool import ScoreResult
from prorl_async.envs.tasks import TaskMix
from prorl_async.eval.validation import ValidationTracker, shard_part, validation_record
from prorl_async.generator.engine import Completion
from prorl_async.generator.validate import Validator
from prorl_async.transport.messages import Validate


class Tokenizer:
    chat_template = "plain"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * 8

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return " ".join(m["content"] for m in messages)


class Engine:
    """Hands out the version it holds now per token; the test moves it on between prompts."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer()
        self.version = 3
        self.calls = 0

    async def generate(self, prompt_ids: list[int], sampling: Any, request_id: str) -> list[Completion]:
        self.calls += 1
        first = self.version
        if self.calls == 2:  # weights swapped in while this prompt's samples were being drawn
            self.version += 2
        versions = np.array([first, self.version], dtype=np.int32)
        return [Completion("<answer>1</answer>", np.array([5, 6], dtype=np.int32), None, versions, "stop")
                for _ in range(sampling.n)]


class Pool:
    async def score(self, text: str, task: dict[str, Any]) -> ScoreResult:
        return ScoreResult(1.0, "ok", "ok")


def test_validation_record_spans_the_versions_its_samples_were_drawn_under() -> None:
    cfg = load_config(None, ["tasks.validation_size=2", "generator.num_generators=1",
                             "generator.max_inflight_groups=1"])
    engine, sent = Engine(), []

    async def send(messages: list[Any]) -> bool:
        sent.extend(messages)
        return True

    async def main() -> None:
        validator = Validator(cfg, 0, TaskMix(cfg.tasks), engine, Pool(), send,  # type: ignore[arg-type]
                              weights=lambda: engine.version)
        validator.request(Validate(version=3, round=0))
        assert validator.task is not None
        await validator.task

    asyncio.run(main())
    assert engine.calls >= 3 and sent
    parts = [shard_part(m) for m in sent]
    assert {p.weights_version for p in parts} == {3}
    assert {p.weights_version_last for p in parts} == {5}
    tracker = ValidationTracker(generators=1, timeout_s=60.0)
    r = tracker.request(version=3, step=3, now=0.0)
    assert r is not None
    for p in parts:
        tracker.add(p)
    record = validation_record(r, ks=(1,), threshold=0.5, now=1.0, reason="complete")
    assert record["weights_versions"] == [3, 5]


def test_an_answer_whose_versions_contradict_themselves_is_refused() -> None:
    import dataclasses

    import pytest

    from prorl_async.eval.validation import PromptRewards, encode_shard

    [answer] = encode_shard(source="generator-0", version=4, round=0, generator=0, generators=1,
                            weights_version=(4, 6), seconds=1.0, failed=0, skipped=0,
                            prompts=[PromptRewards("p", "logic/chain_sum", (1.0,))])
    assert (shard_part(answer).weights_version, shard_part(answer).weights_version_last) == (4, 6)
    for first, last in ((6, 4), (3, 5)):  # highest below lowest; older than the version asked for
        with pytest.raises(ValueError, match="weights versions"):
            shard_part(dataclasses.replace(answer, weights_version=first, weights_version_last=last))
