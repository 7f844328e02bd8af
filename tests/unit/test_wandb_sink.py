"""W&B as a metrics sink: names and rows through a fake ``wandb.init`` (the seam), failure isolation in the metrics
log, the missing-package error, and real offline runs (``WANDB_MODE=offline``, no network) read back from disk."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prorl_async.config import Config
from prorl_async.errors import UserError
from prorl_async.monitor.metrics import MetricsLog, read_metrics, tracked_scalars
from prorl_async.monitor.wandb_sink import RUN_ID_FILE, WandbSink, check_tracking, tracking_sinks


class FakeRun:
    """What the sink uses of a ``wandb.Run``; ``fail_log`` makes ``log`` raise."""

    def __init__(self, fail_log: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.metrics: list[tuple[str, str | None]] = []
        self.finished = 0
        self.fail_log = fail_log

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics.append((name, step_metric))

    def log(self, row: dict[str, Any]) -> None:
        if self.fail_log:
            raise ConnectionError("wandb service gone")
        self.rows.append(row)

    def finish(self) -> None:
        self.finished += 1


class FakeInit:
    """Stands in for ``wandb.init``: keeps its keyword arguments, returns ``run``."""

    def __init__(self, run: FakeRun | None = None, fail: bool = False) -> None:
        self.run = run or FakeRun()
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    def __call__(self, **kwargs: Any) -> FakeRun:
        self.calls.append(kwargs)
        if self.fail:
            raise RuntimeError("api_key not configured (no-tty)")
        return self.run


def _cfg(**tracking: Any) -> Config:
    return Config.model_validate({"tracking": {"wandb": True, **tracking}})


def _write_run(log: MetricsLog) -> None:
    """A few records as the learner writes them, a late validation result among them."""
    log.write("event", event="learner_ready", version=0, groups="tcp://127.0.0.1:1")
    log.write("generator", source="generator-0", tokens_per_s=12.5, groups_sent=3, sampler_state="{}")
    log.write("step", version=1, loss=0.5, buffer_counters={"received": 4, "kept": 2}, reset_reason="",
              prompt_ids=["a"], complete=True, kl=float("nan"))
    log.write("step", version=2, loss=0.25, buffer_counters={"received": 8, "kept": 5})
    log.write("validation", version=1, pass_at_1=0.75, reason="step")
    log.write("generator", source="generator-1", tokens_per_s=7.0)
    log.write("event", event="checkpoint", version=2, buffer_held=3)


EXPECTED_ROWS = [
    {"version": 0, "generator-0/tokens_per_s": 12.5, "generator-0/groups_sent": 3.0},
    {"version": 1, "loss": 0.5, "buffer_counters/received": 4.0, "buffer_counters/kept": 2.0},
    {"version": 2, "loss": 0.25, "buffer_counters/received": 8.0, "buffer_counters/kept": 5.0},
    {"version": 1, "validation/pass_at_1": 0.75},  # arrived after step 2: still at the version it measured
    {"version": 2, "generator-1/tokens_per_s": 7.0},  # generators: the learner's latest version
]


def test_tracked_scalars_names_numbers_as_tensorboard_does() -> None:
    step = {"kind": "step", "time_s": 1.0, "elapsed_s": 2.0, "version": 3, "loss": 0.5, "flag": True,
            "reward_by_domain": {"math": 0.25, "logic": "nan"}, "prompt_ids": ["a"], "reset_reason": ""}
    assert tracked_scalars(step) == {"loss": 0.5, "reward_by_domain/math": 0.25}
    assert tracked_scalars({"kind": "validation", "version": 3, "pass_at_1": 0.5, "reason": "end"}) == {
        "validation/pass_at_1": 0.5}
    assert tracked_scalars({"kind": "generator", "source": "generator-1", "tokens_per_s": 3}) == {
        "generator-1/tokens_per_s": 3.0}
    assert tracked_scalars({"kind": "event", "event": "checkpoint", "version": 3, "buffer_held": 2}) == {}


def test_sink_logs_config_once_and_records_at_their_version(tmp_path: Path) -> None:
    cfg, init = _cfg(wandb_tags=["a"]), FakeInit()
    log = MetricsLog(tmp_path, tensorboard=False, sinks=[WandbSink(cfg, tmp_path, resume=False, init=init)])
    _write_run(log)
    assert init.run.finished == 0
    log.close()
    assert init.run.rows == EXPECTED_ROWS
    assert init.run.finished == 1
    assert init.run.metrics == [("version", None), ("*", "version")]
    (call,) = init.calls
    assert call["config"] == cfg.model_dump(mode="json") and call["config"]["tracking"]["wandb"] is True
    assert call["dir"] == str(tmp_path) and call["resume"] == "allow"
    assert call["id"] == (tmp_path / RUN_ID_FILE).read_text().strip()
    assert (call["project"], call["entity"], call["name"], call["tags"]) == ("prorl-async", None, tmp_path.name, ["a"])
    assert not [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "tracking_off"]


def test_resume_reuses_the_run_id_and_a_fresh_run_gets_a_new_one(tmp_path: Path) -> None:
    def opened(resume: bool) -> str:
        init = FakeInit()
        MetricsLog(tmp_path, tensorboard=False, sinks=[WandbSink(_cfg(), tmp_path, resume=resume, init=init)]).close()
        return init.calls[0]["id"]

    first = opened(resume=False)
    assert opened(resume=True) == first == (tmp_path / RUN_ID_FILE).read_text().strip()
    second = opened(resume=False)  # a new run in the same directory: a new W&B run
    assert second != first and opened(resume=True) == second
    (tmp_path / RUN_ID_FILE).unlink()  # tracking switched on at --resume: a new id, stored from then on
    third = opened(resume=True)
    assert third not in (first, second) and opened(resume=True) == third


def test_a_failing_log_disables_the_sink_without_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    init = FakeInit(FakeRun(fail_log=True))
    log = MetricsLog(tmp_path, tensorboard=False, sinks=[WandbSink(_cfg(), tmp_path, resume=False, init=init)])
    with caplog.at_level(logging.WARNING, logger="prorl_async.monitor.metrics"):
        _write_run(log)  # the first row raises; nothing after it reaches the sink
        init.run.fail_log = False
        log.write("step", version=3, loss=0.1)
        log.close()
    assert init.run.rows == [] and init.run.finished == 1
    assert len([r for r in caplog.records if "wandb" in r.getMessage()]) == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    off = [r for r in records if r.get("event") == "tracking_off"]
    assert len(off) == 1 and off[0]["sink"] == "wandb" and off[0]["stage"] == "write"
    assert "ConnectionError" in off[0]["detail"]
    assert [r["version"] for r in records if r["kind"] == "step"] == [1, 2, 3]  # the JSONL is untouched


def test_a_failing_init_leaves_the_run_without_wandb(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False,
                     sinks=[WandbSink(_cfg(), tmp_path, resume=False, init=FakeInit(fail=True))])
    _write_run(log)
    log.close()
    (off,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "tracking_off"]
    assert off["stage"] == "open" and "api_key" in off["detail"]


def test_missing_wandb_is_a_one_line_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prorl_async.supervisor.supervisor import run

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match=r"pip install 'prorl-async\[wandb\]'") as err:
        check_tracking(_cfg().tracking)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError):
        tracking_sinks(_cfg(), tmp_path, resume=False)
    check_tracking(Config().tracking)  # off: nothing to import
    assert tracking_sinks(Config(), tmp_path, resume=False) == []
    cfg = Config.model_validate({"tracking": {"wandb": True}, "run": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(UserError):
        run(cfg)  # at start-up, before the run directory exists
    assert not (tmp_path / "run").exists()


def test_the_learner_service_resumes_the_w_and_b_run_when_it_resumes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from prorl_async.learner.service import LearnerService
    from prorl_async.monitor import wandb_sink

    init = FakeInit()
    monkeypatch.setattr(wandb_sink, "import_wandb", lambda: SimpleNamespace(init=init))
    cfg = Config.model_validate({"model": {"name": "tiny-random"}, "tracking": {"wandb": True}})
    LearnerService(cfg, tmp_path).metrics.close()
    LearnerService(cfg, tmp_path, resume_from=tmp_path / "checkpoints" / "step-000002").metrics.close()
    LearnerService(cfg.model_copy(update={"tracking": Config().tracking}), tmp_path).metrics.close()  # off
    assert len(init.calls) == 2 and init.calls[0]["id"] == init.calls[1]["id"]
    assert init.calls[0]["dir"] == str(tmp_path) and init.run.finished == 2


# --- real offline runs ---------------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``.wandb`` file: W&B's transaction log is the LevelDB log format
    (32 KiB blocks; chunks with a crc, length and type header: full, first, middle, last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack_from("<4sHB", data) == (b":W&B", 0xBEE1, 0)
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def _config(records: list[Any]) -> dict[str, Any]:
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return {i.key: json.loads(i.value_json) for i in run.config.update}


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


@pytest.mark.usefixtures("offline_wandb")
def test_offline_run_writes_history_under_run_dir_and_resume_continues_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg(wandb_name="smoke")
    log = MetricsLog(run_dir, tensorboard=False, sinks=tracking_sinks(cfg, run_dir, resume=False))
    _write_run(log)
    log.close()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    (first,) = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    records = _wandb_records(first)
    assert _history(records) == EXPECTED_ROWS
    config = _config(records)
    assert config["tracking"] == {**cfg.tracking.model_dump(mode="json")}
    assert config["run"]["max_steps"] == cfg.run.max_steps

    started = first.parent.name.split("-")[2]  # offline-run-YYYYMMDD_HHMMSS-ID: a resume within the same second
    while time.strftime("%Y%m%d_%H%M%S") == started:  # would reuse the directory (a real one takes longer)
        time.sleep(0.05)
    resumed = MetricsLog(run_dir, tensorboard=False, sinks=tracking_sinks(cfg, run_dir, resume=True))
    resumed.write("event", event="resumed", version=2)
    resumed.write("step", version=3, loss=0.125)
    resumed.close()
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # the same W&B run, continued
    (second,) = [f for f in files if f != first]
    assert _history(_wandb_records(second)) == [{"version": 3, "loss": 0.125}]
