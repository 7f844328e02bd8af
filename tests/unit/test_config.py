"""Config loading: every shipped file parses, overrides are typed, errors are one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from prorl_async.config import CONFIGS_DIR, Config, ConfigError, config_to_toml, load_config, write_resolved

CONFIG_FILES = sorted(CONFIGS_DIR.glob("*.toml"))


def test_configs_dir_has_the_three_documented_files() -> None:
    assert {p.name for p in CONFIG_FILES} >= {"default.toml", "tiny.toml", "prorl-1.5b.toml"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    written = write_resolved(cfg, tmp_path)
    assert load_config(written) == cfg


def test_default_is_the_embedded_default() -> None:
    cfg = load_config()
    assert cfg == load_config(CONFIGS_DIR / "default.toml")
    assert cfg.model.name == "smollm2-135m-instruct"


def test_paper_settings() -> None:
    cfg = load_config(CONFIGS_DIR / "prorl-1.5b.toml")
    assert (cfg.learner.batch_groups, cfg.sampling.group_size) == (256, 16)
    assert cfg.sampling.temperature == 1.2
    assert cfg.optim.lr == 2e-6
    assert (cfg.loss.eps_low, cfg.loss.eps_high) == (0.2, 0.4)
    assert cfg.loss.kl_beta > 0 and cfg.reset.interval_steps > 0


def test_the_paper_config_trains_on_training_data_and_keeps_the_benchmarks_for_eval() -> None:
    from reasoning_gym.factory import DATASETS

    from prorl_async.eval.run import select_specs

    cfg = load_config(CONFIGS_DIR / "prorl-1.5b.toml")
    sources = {s.name: s.source.path for s in cfg.tasks.mix if s.source is not None}
    assert set(sources) == {"deepscaler", "eurus2_code", "scp116k", "nemotron_if"}
    logic = [s.name for s in cfg.tasks.mix if s.domain == "logic"]
    assert len(logic) == 96 and set(logic) <= set(DATASETS)  # every generator exists in the installed reasoning-gym
    weights = {d: sum(s.weight for s in cfg.tasks.mix if s.domain == d) for d in ("math", "code", "logic")}
    assert weights == {"math": 65.0, "code": 24.0, "logic": pytest.approx(37.128)}  # ProRL's set sizes (k rows)
    trained = {f"{s.domain}/{s.name}" for s in cfg.tasks.mix}
    evaluated = [label for label, _ in select_specs(cfg)]
    assert "code/humaneval" in evaluated and not trained & set(evaluated)  # no benchmark is trained on


def test_overrides_are_parsed_as_toml_values_and_type_checked() -> None:
    cfg = load_config(
        CONFIGS_DIR / "tiny.toml",
        ["optim.lr=3e-5", "sampling.group_size=8", "run.tui=off", "eval.k=[1, 2]", "model.name=tiny-random"],
    )
    assert cfg.optim.lr == 3e-5 and cfg.sampling.group_size == 8 and cfg.run.tui == "off"
    assert cfg.eval.k == [1, 2]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr' (allowed: betas, fused, grad_clip, lr, warmup_steps, weight_decay)"),
        (["nosuch.key=1"], "unknown key 'nosuch'"),
        (["optim.lr=fast"], "optim.lr: Input should be a valid number"),
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0 (got -1)"),
        (["run.tui=maybe"], "run.tui: Input should be 'auto', 'on' or 'off' (got 'maybe')"),
        (["learner.batch_groups=5", "learner.mini_batches=2"], "must be divisible by learner.mini_batches"),
        (["optim"], "expected section.key=value"),
        (["optim.lr.x=1"], "'lr' is a value, not a section"),
    ],
)
def test_bad_overrides_give_one_line_naming_file_and_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS_DIR / "tiny.toml", overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(("override", "key"), [("sampling.top_p=0.9", "sampling.top_p"),
                                                ("sampling.top_k=20", "sampling.top_k")])
def test_training_refuses_truncated_sampling(override: str, key: str) -> None:
    """vLLM renormalises its log-probs after top-p/top-k filtering while the learner uses the full softmax."""
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS_DIR / "tiny.toml", [override])
    message = str(info.value)
    assert message.startswith(f"{CONFIGS_DIR / 'tiny.toml'}: {key}: ") and "\n" not in message
    assert "importance weights" in message and "full softmax" in message
    assert ("top_p = 1.0" if key.endswith("top_p") else "top_k = -1 or 0") in message  # what is allowed


def test_eval_may_truncate_sampling() -> None:
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ["eval.top_p=0.9", "eval.top_k=20", "sampling.top_k=0"])
    assert (cfg.eval.top_p, cfg.eval.top_k, cfg.sampling.top_p) == (0.9, 20, 1.0)
    assert load_config(CONFIGS_DIR / "prorl-1.5b.toml").eval.top_p == 0.95


def test_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text("[[tasks.mix]]\nname = 'chain_sum'\nwieght = 2\n")
    expected = r"typo\.toml: unknown key 'tasks\.mix\.0\.wieght' \(allowed: curriculum, domain, "
    with pytest.raises(ConfigError, match=expected):
        load_config(typo)


def test_every_field_is_documented() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            nested = getattr(field.annotation, "model_fields", None)
            if nested is not None:
                missing += walk(field.annotation)
        return missing

    assert walk(Config) == []


def test_resolved_config_is_complete_toml() -> None:
    text = config_to_toml(Config())
    for section in Config.model_fields:
        assert f"[{section}]" in text


def test_max_staleness_auto() -> None:
    cfg = load_config(None, ["buffer.max_staleness=auto", "buffer.auto_max_staleness=3"])
    assert cfg.buffer.auto and cfg.buffer.ceiling == 3 and cfg.buffer.initial_bound == 1
    fixed = load_config(None, ["buffer.max_staleness=2"])
    assert not fixed.buffer.auto and fixed.buffer.ceiling == fixed.buffer.initial_bound == 2
    assert load_config(write_resolved_roundtrip(cfg)).buffer.max_staleness == "auto"
    for bad in ("fast", "-1", "1.5"):
        with pytest.raises(ConfigError, match="max_staleness"):
            load_config(None, [f"buffer.max_staleness={bad}"])


def write_resolved_roundtrip(cfg: Config) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "config.toml"
    path.write_text(config_to_toml(cfg))
    return path


def test_engine_max_num_seqs_fits_every_admitted_sample() -> None:
    from prorl_async.generator.engine import engine_max_num_seqs

    cfg = load_config(None, ["generator.max_inflight_groups=32", "sampling.group_size=8"])
    assert engine_max_num_seqs(cfg, 128) == 256  # 32 groups x 8 samples, above vLLM's engine default
    cfg = load_config(None, ["generator.max_inflight_groups=8", "sampling.group_size=8"])
    assert engine_max_num_seqs(cfg, 128) == 128  # never below vLLM's default (validation requests use it)
    cfg = load_config(None, ["generator.max_num_seqs=48"])
    assert engine_max_num_seqs(cfg, 128) == 48


def test_a_config_extends_another_table_by_table(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('[run]\nmax_steps = 7\nseed = 3\n[[tasks.mix]]\nname = "chain_sum"\n')
    (tmp_path / "top.toml").write_text('extends = "base.toml"\n[run]\nmax_steps = 9\n[cluster]\nlauncher = "ray"\n')
    cfg = load_config(tmp_path / "top.toml")
    assert (cfg.run.max_steps, cfg.run.seed, cfg.cluster.launcher) == (9, 3, "ray")  # merged key by key
    assert [t.name for t in cfg.tasks.mix] == ["chain_sum"]
    assert load_config(CONFIGS_DIR / "prorl-1.5b-ray-2x8.toml").sampling == load_config(
        CONFIGS_DIR / "prorl-1.5b.toml").sampling


def test_extends_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match="circle"):
        load_config(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match=r"missing\.toml: no such config file \(extended by"):
        load_config(tmp_path / "c.toml")


def test_learner_ranks_come_from_nodes_and_gpus_and_impossible_layouts_are_refused() -> None:
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ["cluster.launcher=ray", "cluster.learner_nodes=2",
                                                  "cluster.learner_gpus_per_node=8"])
    assert (cfg.cluster.ranks_per_node, cfg.cluster.learner_ranks) == (8, 16)
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ["cluster.learner_ranks_per_node=2"])
    assert cfg.cluster.learner_ranks == 2  # CPU ranks on this machine
    assert load_config(CONFIGS_DIR / "tiny.toml").cluster.learner_ranks == 1
    with pytest.raises(ConfigError, match=r"needs cluster\.launcher"):
        load_config(CONFIGS_DIR / "tiny.toml", ["cluster.learner_nodes=2"])
    with pytest.raises(ConfigError, match="one rank per GPU"):
        load_config(CONFIGS_DIR / "tiny.toml", ["cluster.learner_gpus_per_node=4", "cluster.learner_ranks_per_node=2"])
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ["cluster.launcher=ray", "cluster.learner_resources={learner_node=1}"])
    assert cfg.cluster.learner_resources == {"learner_node": 1}
