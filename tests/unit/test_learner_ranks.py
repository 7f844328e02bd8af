"""A learner of two ranks in real processes: rank 0 leads (``LeadingLearner``), rank 1 follows its commands.

The test runs this file as a script once per rank (``python test_learner_ranks.py MODE RANK OUT NONCE``):

- ``train``: four steps with two validation rewards between them (a plateau: the reset policy resets the reference
  after step 3, on both ranks only if the rewards reached rank 1), a checkpoint, the weights; the test process does
  the same on one rank and compares.
- ``silent``: rank 0 stops pinging and stays alive: rank 1 must give up after ``HEARING_S`` (patched to 3 s).
- ``die``: rank 0 exits in the middle of the run: rank 1 must say so and exit with 1.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_learner import tiny_config
from test_learner_fsdp import skewed_batch

from prorl_async.config import Config
from prorl_async.learner import ranks
from prorl_async.learner.ranks import LeadingLearner, RankSpec, join_ranks, pack_batch, unpack_batch, wait_for_leader
from prorl_async.learner.trainer import Learner


def ranks_config(out: Path) -> Config:
    return tiny_config(learner={"micro_batch_tokens": 32, "num_threads": 1}, reset={"val_patience_steps": 1},
                       cluster={"placement_timeout_s": 60})


def steps(learner: Learner | LeadingLearner, out: Path) -> list[dict]:
    metrics = [learner.train_step(skewed_batch(1)).as_dict()]
    learner.observe_validation(0.5, step=1)
    metrics.append(learner.train_step(skewed_batch(2)).as_dict())
    learner.observe_validation(0.4, step=2)  # no better after 1 step of patience: a reset after the next step
    learner.save_checkpoint(out / "ckpt")
    metrics.append(learner.train_step(skewed_batch(3)).as_dict())
    metrics.append(learner.train_step(skewed_batch(4)).as_dict())
    return metrics


def _rank_main(mode: str, rank: int, out: Path, nonce: str) -> int:
    cfg = ranks_config(out)
    spec = RankSpec(rank, 2, nonce)
    if mode == "silent":
        ranks.HEARING_S = 3.0
        ranks.PING_S = 1000.0
    if rank:
        return ranks.follow(cfg, out, spec)
    commands = join_ranks(cfg, out, spec)
    lead = LeadingLearner(Learner(cfg), commands)
    if mode == "silent":
        time.sleep(8)
        os._exit(0)
    if mode == "die":
        lead.train_step(skewed_batch(1))
        os._exit(3)
    ranks.PING_S = 0.2
    time.sleep(1.0)  # pings while idle: rank 1 keeps listening
    metrics = steps(lead, out)
    weights = {name: w.clone() for name, w in lead.weights()}
    lead.close()
    (out / "metrics.json").write_text(json.dumps(metrics))
    save_file(weights, out / "weights.safetensors")
    return 0


def _run(mode: str, out: Path) -> list[tuple[int, str, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(rank), str(out), "nonce-1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    results = []
    try:
        for p in reversed(procs):  # rank 1 first: when it ended is what the failure modes are about
            log = p.communicate(timeout=180)[0]
            results.append((p.returncode, log, time.monotonic() - started))
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    return results[::-1]


def test_a_batch_crosses_to_the_other_ranks_whole() -> None:
    batch = skewed_batch(7)
    back = unpack_batch(pack_batch(batch))
    for name in ("prompt_ids", "prompt_lens", "response_ids", "response_lens", "behaviour_logprobs",
                 "policy_versions", "rewards"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
        assert getattr(back, name).dtype == getattr(batch, name).dtype
    body = pack_batch(batch)
    body["rewards"][0] = "object"
    with pytest.raises(ValueError, match="dtype 'object'"):
        unpack_batch(body)


def test_a_rank_joins_only_its_own_launch(tmp_path: Path) -> None:
    path = tmp_path / ranks.RENDEZVOUS_FILE
    path.write_text(json.dumps({"nonce": "old", "host": "127.0.0.1", "port": 1}))
    with pytest.raises(TimeoutError, match="placement_timeout_s"):
        wait_for_leader(path, "new", timeout_s=0.5)
    path.write_text(json.dumps({"nonce": "new", "host": "127.0.0.1", "port": 2}))
    assert wait_for_leader(path, "new", timeout_s=0.5)["port"] == 2
    with pytest.raises(ValueError, match="outside a world of 2"):
        RankSpec(2, 2, "x")


def test_two_ranks_led_by_rank_0_match_one_rank_with_validation_resets_and_a_checkpoint(tiny_model_dir, tmp_path):
    (lead, lead_log, _), (follower, follower_log, _) = _run("train", tmp_path)
    assert lead == 0, lead_log[-4000:]
    assert follower == 0, follower_log[-4000:]
    assert "stopped by rank 0 at version 4" in follower_log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    weights = load_file(tmp_path / "weights.safetensors")

    single_dir = tmp_path / "single"
    single = Learner(ranks_config(single_dir))
    expected = steps(single, single_dir)
    assert [m["reset_reason"] for m in expected] == ["", "", "validation_plateau", ""]
    for got, want in zip(metrics, expected, strict=True):
        assert got["reset_reason"] == want["reset_reason"]
        for key in ("loss", "pg_loss", "kl", "tokens", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    for name, w in single.weights():  # Adam moves each weight by ~lr: compare at a fraction of it
        torch.testing.assert_close(weights[name], w, rtol=0, atol=2e-5)
    saved = json.loads((tmp_path / "ckpt" / "learner.json").read_text())
    want = json.loads((single_dir / "ckpt" / "learner.json").read_text())
    assert saved["reset_policy"]["best_val_reward"] == want["reset_policy"]["best_val_reward"] == 0.5


def test_a_follower_whose_leader_goes_silent_gives_up_and_says_so(tiny_model_dir, tmp_path):
    (_, _, lead_s), (follower, log, follower_s) = _run("silent", tmp_path)
    assert follower == 1, log[-4000:]
    assert "lost rank 0 of the learner" in log
    assert follower_s < lead_s - 2  # it did not wait for rank 0 to exit


def test_a_follower_whose_leader_dies_exits_with_1(tiny_model_dir, tmp_path):
    (lead, _, _), (follower, log, _) = _run("die", tmp_path)
    assert lead == 3
    assert follower == 1, log[-4000:]
    assert "lost rank 0 of the learner" in log


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(_rank_main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]))
