"""Weight broadcast into a real vLLM engine (CPU, tiny model) in another process, the learner in this one.

One engine for the module (``weight_sync_generator.py``), driven over stdin/stdout:

- in-flight update: requests are mid-generation when version 1 arrives; every token's vLLM log-prob matches a
  transformers forward of the weights of the version stamped on it (<= 1e-4, fp32), the stamps change
  mid-sample, and new requests with the same (cached) prompts see only the new weights;
- a receiver (a plain process) dies mid-broadcast: the sender reports it within the timeout and the engine
  still gets that version; a new receiver joins and gets the next one; the engine's worker leaves and rejoins
  (as a restarted generator would) and gets the one after, the learner's sender never restarting.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from prorl_async.config import WeightSyncConfig
from prorl_async.transport.weights.sender import WeightSender

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "weight_sync_generator.py"
PEER = HERE.parent / "unit" / "test_weight_sync.py"  # its __main__ is a plain receiver process
TIMEOUT_S = 20.0
TOL = 1e-4


class Rig:
    """The learner side: the sender, the transformers model and the generator process."""

    def __init__(self, model_dir: Path, run_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = WeightSyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.25)
        self.sender = WeightSender(self.cfg)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(run_dir / "vllm-cache")}
        self.log = open(run_dir / "generator.log", "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(HARNESS), str(model_dir), "127.0.0.1", str(self.sender.port), "0",
             json.dumps(self.cfg.model_dump())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            start_new_session=True,
        )
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        # plain receivers for the fault test, started now so that their start-up overlaps the engine's; they
        # join only when told to (a line on stdin)
        peer = [sys.executable, str(PEER), str(self.sender.port)]
        self.peers = {
            name: subprocess.Popen([*peer, f"{name}.rank0", mode, str(TIMEOUT_S)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, mode in (("gen7", "wait,die"), ("gen8", "wait,receive:1"))
        }
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.base = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.run_dir = run_dir

    def weights(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """Version 0 is the model on disk; every other version is a different, seeded perturbation of it.

        From version 2 on, the tied head is also named (``lm_head.weight``, the embedding's tensor), as
        ``Learner.weights()`` does: it travels once, as an alias. Version 1 leaves it out, so that the worker's
        repack of a tied head that ``reload_weights`` did not reprocess is exercised too."""
        if version == 0:
            return list(self.base.items())
        g = torch.Generator().manual_seed(version)
        named = [(n, p + 0.05 * torch.randn(p.shape, generator=g)) for n, p in self.base.items()]
        embed = dict(named)["model.embed_tokens.weight"]
        return [*named, ("lm_head.weight", embed)] if version >= 2 else named

    def logprobs(self, version: int, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            for (_, p), (_, w) in zip(self.model.named_parameters(), self.weights(version), strict=False):
                p.copy_(w)  # the tied head, when named, is the embedding: nothing more to copy
            ids = torch.tensor([prompt_ids + token_ids])
            logits = self.model(ids).logits[0, len(prompt_ids) - 1 : -1]
            return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(token_ids)[:, None])[:, 0]

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {event!r} from the generator in {timeout} s:\n{self.tail()}")
            if msg is None:
                pytest.fail(f"the generator exited (rc={self.proc.poll()}) waiting for {event!r}:\n{self.tail()}")
            if msg["event"] == event:
                return msg
            if time.monotonic() > deadline:
                pytest.fail(f"no {event!r} in {timeout} s (last {msg})")

    def tail(self) -> str:
        self.log.flush()
        return (self.run_dir / "generator.log").read_text()[-4000:]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@ws "):
                self.events.put(json.loads(line[5:]))
            else:
                self.log.write(line)
        self.events.put(None)

    def go(self, peer: str) -> None:
        self.peers[peer].stdin.write("go\n")
        self.peers[peer].stdin.flush()

    def close(self) -> None:
        for p in self.peers.values():
            if p.poll() is None:
                p.kill()  # only the peers this test started
        try:
            self.send(cmd="exit")
            self.proc.wait(timeout=30)
        except Exception:
            os.killpg(self.proc.pid, 9)  # the generator and its engine core: processes this test started
            self.proc.wait()
        self.sender.close()
        self.log.close()


@pytest.fixture(scope="module")
def rig(tiny_model_dir, tmp_path_factory):
    r = Rig(tiny_model_dir, tmp_path_factory.mktemp("weight_sync"))
    try:
        joined = r.expect("joined", timeout=180)
        assert joined["after_version"] == -1 and joined["backend"] == "gloo"
        yield r
    finally:
        r.close()


def check_logprobs(rig: Rig, samples: list[dict]) -> dict[int, int]:
    """Every token's vLLM log-prob against a forward of the weights of its stamped version; tokens per version."""
    per_version: dict[int, int] = {}
    for s in samples:
        got = torch.tensor(s["logprobs"])
        versions = torch.tensor(s["versions"])
        for v in versions.unique().tolist():
            mask = versions == v
            want = rig.logprobs(v, s["prompt_ids"], s["token_ids"])
            diff = (got[mask] - want[mask]).abs().max().item()
            assert diff <= TOL, f"{s['id']}/{s['index']}: version {v} tokens differ by {diff:.2e}"
            other = rig.logprobs(v - 1 if v else v + 1, s["prompt_ids"], s["token_ids"])
            assert (got[mask] - other[mask]).abs().max().item() > 1e-2  # the check can tell versions apart
            per_version[v] = per_version.get(v, 0) + int(mask.sum())
    return per_version


def prompts(n: int, length: int = 150) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(10, 1000, (length,), generator=g).tolist() for _ in range(n)]


def test_in_flight_update_matches_the_new_weights(rig: Rig) -> None:
    reqs = [{"id": f"r{i}", "prompt_ids": p, "n": 1 + i % 2, "max_tokens": 48} for i, p in enumerate(prompts(3))]
    rig.send(cmd="generate", requests=reqs, update_after=12, version=1)
    stats = rig.sender.broadcast(1, rig.weights(1))
    assert stats.delivered == ["gen0.rank0"] and not stats.failed, stats
    out = rig.expect("generated")
    [update] = out["updates"]
    assert update["version"] == 1 and update["buckets"] > 1
    for s in out["samples"]:  # in flight: every sample began with version 0 and ended with version 1
        assert s["versions"][0] == 0 and s["versions"][-1] == 1 and len(s["token_ids"]) == 48, s["versions"]
    assert check_logprobs(rig, out["samples"]).keys() == {0, 1}

    # the same prompts again: their cached prefix blocks were computed with version 0 and must be gone
    rig.send(cmd="generate", requests=[{**r, "max_tokens": 8} for r in reqs])
    out = rig.expect("generated")
    assert check_logprobs(rig, out["samples"]).keys() == {1}


def test_dead_receiver_does_not_stop_the_others_and_newcomers_get_the_next_version(rig: Rig) -> None:
    sys.path.insert(0, str(PEER.parent))
    from test_weight_sync import checksum

    rig.go("gen7")  # dies after the first tensor of its first update
    rig.sender.wait_for_members(2, 60)
    rig.send(cmd="update", version=2)
    start = time.monotonic()
    stats = rig.sender.broadcast(2, rig.weights(2))
    assert time.monotonic() - start < TIMEOUT_S
    assert stats.delivered == ["gen0.rank0"] and list(stats.failed) == ["gen7.rank0"], stats
    assert rig.expect("updated")["version"] == 2
    assert rig.peers["gen7"].wait(30) == 3

    rig.go("gen8")  # a new generator joins while the learner keeps running
    rig.sender.wait_for_members(2, 60)
    rig.send(cmd="update", version=3)
    stats = rig.sender.broadcast(3, rig.weights(3))
    out, err = rig.peers["gen8"].communicate(timeout=60)
    assert stats.delivered == ["gen0.rank0", "gen8.rank0"] and not stats.failed, (stats, out, err[-3000:])
    assert rig.expect("updated")["version"] == 3
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert lines == [{"event": "joined", "after_version": 2},
                     {"event": "received", "version": 3, "checksum": checksum(rig.weights(3))}], err[-2000:]

    # the engine's worker joins again (a restarted generator does the same) and gets the next version
    rig.send(cmd="rejoin")
    assert rig.expect("joined")["after_version"] == 3
    rig.send(cmd="update", version=4)
    stats = rig.sender.broadcast(4, rig.weights(4))
    assert stats.delivered == ["gen0.rank0"] and list(stats.failed) == ["gen8.rank0"], stats  # gen8 has exited
    assert rig.expect("updated")["version"] == 4
    rig.send(cmd="generate", requests=[{"id": "after", "prompt_ids": prompts(1)[0], "n": 2, "max_tokens": 8}])
    assert check_logprobs(rig, rig.expect("generated")["samples"]).keys() == {4}
