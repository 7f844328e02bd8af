"""The generator process end to end: real vLLM (CPU, tiny model), real sockets, a real weight broadcast.

This test plays the learner: it binds the groups (PULL) and control (XPUB) sockets, owns the weight-sync
sender, starts ``python -m prorl_async.generator`` once, and checks in one run:

- groups arrive with n samples, log-probs that match a transformers forward pass (temperature-scaled, the
  learner's convention), per-token versions, and chain_sum rewards equal to the verifier's;
- an in-flight weight update (version 1, perturbed weights) lands while groups are generating: later
  tokens carry version 1 and their log-probs match the new weights, earlier ones version 0 and the old;
- the generator samples exactly the learner's requests, each answered once with ``seq`` = its request id; a
  request for another generator and a repeated request id are ignored; a request whose ``min_version`` is
  ahead of the loaded weights waits for them (all its tokens carry the new version);
- a reward function that hangs (once) and raises (once) costs those two samples a 0 reward with a reason,
  counted in the metrics, and the generator goes on;
- ``Stop`` ends the process with exit code 0 and a final status (the generator keeps no prompt state).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from prorl_async.config import Config, write_resolved
from prorl_async.envs.score import score
from prorl_async.envs.tasks import TaskMix
from prorl_async.transport.messages import (
    GroupRequest,
    Heartbeat,
    Ready,
    Status,
    Stop,
    TrajectoryGroup,
    WeightsReady,
    decode,
    encode,
)
from prorl_async.transport.sockets import Transport, bound_endpoint
from prorl_async.transport.weights.sender import WeightSender

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

HERE = Path(__file__).parent
TEMPERATURE = 1.2
GROUP_SIZE = 4
FIRST = 6  # requests sent before the weight update (min_version 0)


def make_config(tmp_path: Path) -> Config:
    return Config.model_validate({
        "run": {"run_dir": str(tmp_path / "run"), "seed": 3},
        "model": {"name": "tiny-random", "max_model_len": 640},
        "tasks": {"mix": [{"name": "chain_sum", "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                           "max_digits": 1}}],
                  "train_size": 200, "validation_size": 4, "prefill": "<answer>"},
        "sampling": {"group_size": GROUP_SIZE, "temperature": TEMPERATURE, "max_response_tokens": 320},
        "generator": {"max_inflight_groups": 2, "reward_workers": 2, "reward_timeout_s": 6.0, "heartbeat_s": 0.3,
                      "reward_function": "generator_rewards:reward"},
        "buffer": {"max_staleness": 1, "variance_filter": False},
        "learner": {"batch_groups": 2},
        "weight_sync": {"timeout_s": 60.0},
    })


class Learner:
    """The learner's sockets, driven by this test: groups PULL, control XPUB (answering new subscribers)."""

    def __init__(self, transport: Transport) -> None:
        self.pull = transport.socket(zmq.PULL, transport.endpoint("groups"), bind=True, groups=True)
        self.xpub = transport.socket(zmq.XPUB, transport.endpoint("control"), bind=True)
        self.latest: list[bytes] | None = None
        self.groups: list[TrajectoryGroup] = []
        self.metrics: list[Status] = []
        self.others: list[object] = []

    def publish(self, msg: object, latest: bool = True) -> None:
        frames = encode(msg)  # type: ignore[arg-type]
        if latest:
            self.latest = frames
        self.xpub.send_multipart(frames)

    def pump(self, seconds: float, until=lambda: False) -> bool:
        """Receive for up to ``seconds``; True as soon as ``until()`` holds."""
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until():
                return True
            for sock, _ in poller.poll(50):
                if sock is self.xpub:
                    if self.xpub.recv()[:1] == b"\x01" and self.latest is not None:
                        self.xpub.send_multipart(self.latest)
                    continue
                msg = decode(self.pull.recv_multipart())
                if isinstance(msg, TrajectoryGroup):
                    self.groups.append(msg)
                elif isinstance(msg, Status):
                    self.metrics.append(msg)
                else:
                    self.others.append(msg)
        return until()

    def last_metrics(self) -> dict:
        return self.metrics[-1].values if self.metrics else {}


def reference_logprobs(model, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    ids = torch.as_tensor(np.concatenate([prompt, tokens]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(tokens.astype(np.int64))[:, None])[:, 0].numpy()


def test_generator_process_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config(tmp_path)
    config_path = write_resolved(cfg, tmp_path / "run")
    calls = tmp_path / "calls"
    calls.mkdir()
    old_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    new_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in new_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    log_path = tmp_path / "generator.log"
    with Transport(cfg.transport) as transport, WeightSender(cfg.weight_sync) as sender, open(log_path, "w") as log:
        learner = Learner(transport)
        learner.publish(WeightsReady(0))
        env = {**os.environ, "GENERATOR_TEST_CALLS": str(calls),
               "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        proc = subprocess.Popen(
            [sys.executable, "-m", "prorl_async.generator", "--config", str(config_path), "--generator-id", "0",
             "--groups", bound_endpoint(learner.pull), "--control", bound_endpoint(learner.xpub),
             "--weight-sync", f"127.0.0.1:{sender.port}", "--run-dir", str(tmp_path / "run")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            def output() -> str:
                return log_path.read_text()[-6000:]

            def request(request_id: int, index: int, min_version: int = 0, generator_id: int = 0) -> GroupRequest:
                msg = GroupRequest(generator_id=generator_id, request_id=request_id, spec=0, index=index, epoch=0,
                                   min_version=min_version)
                learner.publish(msg, latest=False)
                return msg

            # 1. The generator says Ready, joins the weight group and samples the requests it is sent.
            assert learner.pump(300, lambda: bool(learner.others)), output()
            assert learner.others[0] == Ready("generator-0")
            for i in range(FIRST):
                request(i, index=10 + i)
            request(0, index=99)  # a repeated id: ignored
            request(50, index=98, generator_id=1)  # another generator's: ignored
            assert learner.pump(300, lambda: learner.last_metrics().get("requests_in_flight", 0) > 0), output()
            assert sender.members == ["gen0.rank0"]
            # 2. A request that needs version 1 waits; an in-flight update to version 1 while groups are generating.
            request(FIRST, index=10 + FIRST, min_version=1)
            learner.publish(WeightsReady(1))
            stats = sender.broadcast(1, new_model.named_parameters(remove_duplicate=False))
            assert stats.delivered == ["gen0.rank0"] and not stats.failed, stats
            # 3. Every request is answered once, by its group.
            assert learner.pump(120, lambda: len(learner.groups) >= FIRST + 1), output()
            learner.pump(3.0, lambda: learner.last_metrics().get("groups_in_flight") == 0)
            assert sorted(g.seq for g in learner.groups) == list(range(FIRST + 1))
            by_seq = {g.seq: g for g in learner.groups}
            indices = [int(by_seq[i].prompt_id.split("/")[4]) for i in range(FIRST + 1)]
            assert indices == [10 + i for i in range(FIRST + 1)]
            assert all((s.versions == 1).all() for s in by_seq[FIRST].samples), "started before its min_version"
            m = learner.last_metrics()
            assert m["groups_in_flight"] == 0 and m["policy_version"] == 1 and m["weight_updates"] == 1, m
            assert m["requests_received"] == FIRST + 1, m
            learner.publish(Stop("test done"))
            assert proc.wait(timeout=60) == 0, output()
            learner.pump(1.0, lambda: learner.last_metrics().get("final") == 1)
        finally:
            if proc.poll() is None:
                proc.kill()  # only the process this test started
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):  # and what it started (vLLM's engine
                os.killpg(proc.pid, signal.SIGKILL)  # core, scoring workers), left behind when the test failed

    groups = learner.groups
    mix = TaskMix(cfg.tasks)
    mixed_samples = 0
    for g in groups:
        assert len(g.samples) == GROUP_SIZE and g.generator_id == 0
        task = mix.train_problem(int(g.prompt_id.split("/")[2]), int(g.prompt_id.split("/")[4]))
        assert task.id == g.prompt_id and (g.task, g.domain) == ("chain_sum", "logic")
        for s in g.samples:
            assert len(s.token_ids) > 0
            assert set(np.unique(s.versions)) <= {0, 1}
            mixed_samples += bool(s.versions[0] == 0 and s.versions[-1] == 1)
            ref_old = reference_logprobs(old_model, g.prompt_token_ids, s.token_ids)
            ref_new = reference_logprobs(new_model, g.prompt_token_ids, s.token_ids)
            expected = np.where(s.versions == 0, ref_old, ref_new)
            np.testing.assert_allclose(s.logprobs, expected, atol=2e-3, rtol=0)
            if "timeout" in s.reward_reason or "raised" in s.reward_reason:
                assert s.reward == 0.0
                continue
            text = cfg.tasks.prefill + tokenizer.decode(s.token_ids, skip_special_tokens=True)
            assert (s.reward, s.reward_reason) == score(text, task), s.reward_reason
    assert mixed_samples > 0, "no sample spanned the in-flight update"
    reasons = [s.reward_reason for g in groups for s in g.samples]
    assert sum("timeout" in r for r in reasons) == 1 and sum("injected by the test" in r for r in reasons) == 1, reasons
    final = learner.last_metrics()
    assert final.get("final") == 1 and final["score_timeout"] == 1 and final["score_error"] == 1, final
    assert any(isinstance(m, Heartbeat) for m in learner.others)
