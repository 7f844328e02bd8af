"""Data sources: the user's own rows (JSONL, parquet, CSV, saved and repository directories) as a task spec.

Every file is made in tmp_path; ``datasets`` converts it into a cache under tmp too, offline.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prorl_async.config import Config, ConfigError, TasksConfig, TaskSpec, config_to_toml, load_config
from prorl_async.envs import data as data_module
from prorl_async.envs.curriculum import spec_levels
from prorl_async.envs.data import DataSource, check
from prorl_async.envs.data_split import DataSplit, prompt_key
from prorl_async.envs.score import score
from prorl_async.envs.tasks import Task, TaskMix, build_messages, render_prompt
from prorl_async.errors import UserError
from prorl_async.models import build_tiny_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when ``datasets`` is imported: on the first load


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """``datasets``' cache in tmp (read at each load), not in the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


def spec(path, **kwargs) -> TaskSpec:
    source = {"path": str(path), **kwargs.pop("source", {})}
    return TaskSpec(source=source, **kwargs)


def tasks(*specs: TaskSpec, **kwargs) -> TasksConfig:
    kwargs.setdefault("validation_size", 4)
    return TasksConfig(mix=list(specs), **kwargs)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sums(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "id": i} for i in range(start, start + n)]


def verl_rows(n: int) -> list[dict]:
    """Rows in verl's parquet schema (``examples/data_preprocess/gsm8k.py``)."""
    return [{"data_source": "openai/gsm8k", "ability": "math",
             "prompt": [{"role": "user", "content": f"Add {i} and {i}. Put the answer in \\boxed{{}}."}],
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"split": "train", "index": i}} for i in range(n)]


def all_training(mix: TaskMix, spec_index: int = 0) -> list[Task]:
    return [mix.train_problem(spec_index, j) for j in range(mix.train_size(spec_index))]


# ------------------------------------------------------------------------------------------- formats


def test_jsonl_string_prompts_become_tasks_with_their_row(tmp_path):
    write_jsonl(tmp_path / "sums.jsonl", sums(30))
    cfg = tasks(spec(tmp_path / "sums.jsonl"), system_prompt="Be brief.")
    mix = TaskMix(cfg)
    assert mix.train_size(0) == 26 and mix.levels(0) == 1
    task = mix.train_problem(0, 0)
    assert task.domain == "math" and task.name == "sums" and task.id == "math/sums/0/train/0"
    row = task.checker["row"]
    assert task.question == row["question"] and task.answer == row["answer"] == str(2 * row["id"])
    assert build_messages(task, cfg) == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": row["question"]}]  # as it is: no format line
    assert score(f"<answer>{task.answer}</answer>", task) == (1.0, "correct")
    assert "reward_fn" not in task.checker


def test_verl_parquet_is_read_with_only_its_path(tmp_path):
    pq.write_table(pa.Table.from_pylist(verl_rows(40)), tmp_path / "train.parquet")
    source = check(spec(tmp_path / "train.parquet"))
    assert (source.prompt, source.answer, source.chat, source.num_rows) == ("prompt", "reward_model.ground_truth",
                                                                           True, 40)
    assert source.columns == ["data_source", "ability", "prompt", "reward_model", "extra_info"]
    mix = TaskMix(tasks(spec(tmp_path / "train.parquet")))
    task = mix.train_problem(0, 3)
    row = task.checker["row"]
    assert task.answer == row["reward_model"]["ground_truth"] and task.question == row["prompt"][0]["content"]
    assert task.metadata["messages"] == row["prompt"]
    assert score(f"so \\boxed{{{task.answer}}}", task) == (1.0, "correct")  # the built-in math verifier
    assert score("<answer>-1</answer>", task)[0] == 0.0


def test_csv(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\n" + "".join(f"Capital number {i}?,{i}\n" for i in range(12)))
    mix = TaskMix(tasks(spec(tmp_path / "qa.csv")))
    task = mix.train_problem(0, 0)
    assert task.question.startswith("Capital number")
    assert task.checker["row"]["answer"] == int(task.answer)  # CSV's integers stay numbers in the row, text as answer


def test_saved_dataset_directory_and_its_splits(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"problem": [f"p{i}" for i in range(10)], "solution": [str(i) for i in range(10)]}
                               ).save_to_disk(str(tmp_path / "one"))
    mix = TaskMix(tasks(spec(tmp_path / "one"), validation_size=2))
    first = mix.train_problem(0, 0)
    assert mix.train_size(0) == 8 and first.answer == first.checker["row"]["solution"]
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": list("abc"), "answer": list("123")}),
                                 "test": datasets.Dataset.from_dict({"prompt": ["x", "a"], "answer": ["9", "1"]})})
    both.save_to_disk(str(tmp_path / "both"))
    held_out_test = TaskMix(tasks(spec(tmp_path / "both", source={"validation_split": "test"}), validation_size=5))
    assert sorted(t.question for t in held_out_test.validation_tasks()) == ["a", "x"]  # all it has (fewer than 5)
    assert [t.question for t in all_training(held_out_test)] == ["b", "c"]  # "a" is a held-out prompt
    with pytest.raises(UserError, match=r"both: no split 'dev' \(splits: train, test\); set source.split"):
        TaskMix(tasks(spec(tmp_path / "both", source={"split": "dev"})))


def test_local_repository_directory_reads_its_split(tmp_path):
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    write_jsonl(repo / "train.jsonl", sums(10))
    write_jsonl(repo / "test.jsonl", sums(3, start=100))
    mix = TaskMix(tasks(spec(tmp_path / "repo", source={"validation_split": "test"}), validation_size=3))
    assert mix.train_size(0) == 10
    assert {t.answer for t in mix.validation_tasks()} == {"200", "202", "204"}


# --------------------------------------------------------------------------------------- validation


def test_validation_path_rows_are_held_out_and_their_prompts_never_trained(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sums(20))
    write_jsonl(tmp_path / "val.jsonl", sums(3, start=5) + sums(2, start=50))  # 3 prompts also in training
    cfg = tasks(spec(tmp_path / "train.jsonl", source={"validation_path": str(tmp_path / "val.jsonl")}),
                validation_size=10)
    mix = TaskMix(cfg)
    held = {t.question for t in mix.validation_tasks()}
    assert len(held) == 5 and all(t.metadata["source"].endswith("val.jsonl") for t in mix.validation_tasks())
    training = [t.question for t in all_training(mix)]
    assert len(training) == 17 and not held & set(training)


def test_held_out_prompts_never_in_training_even_duplicated(tmp_path):
    rows = sums(50)
    rows += [dict(r, id=1000 + k) for k, r in enumerate(rows[:25])] * 2  # every early prompt three times
    write_jsonl(tmp_path / "dups.jsonl", rows)
    cfg = tasks(spec(tmp_path / "dups.jsonl"), validation_size=10, seed=3)
    mix = TaskMix(cfg)
    held = [t.question for t in mix.validation_tasks()]
    assert len(set(held)) == 10  # distinct
    training = [t.question for t in all_training(mix)]
    assert not set(held) & set(training)
    copies = {q: sum(r["question"] == q for r in rows) for q in held}
    assert len(training) == len(rows) - sum(copies.values())
    again = TaskMix(cfg)
    assert [t.question for t in again.validation_tasks()] == held  # deterministic from the seed
    assert [t.question for t in TaskMix(tasks(spec(tmp_path / "dups.jsonl"), validation_size=10, seed=4)
                                        ).validation_tasks()] != held


def test_chat_prompts_compare_by_their_messages(tmp_path):
    system = {"role": "system", "content": "You are terse."}
    rows = []
    for i in range(12):
        rows.append({"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)})
        rows.append({"prompt": [system, {"role": "user", "content": f"q{i}"}], "answer": str(i)})  # another prompt
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": "q3", "answer": "3"}])  # a string equals a one-user-message chat
    cfg = tasks(spec(tmp_path / "chat.parquet", source={"validation_path": str(tmp_path / "val.jsonl")}))
    keys = [prompt_key(t.checker["row"]["prompt"]) for t in all_training(TaskMix(cfg))]
    assert len(keys) == 23 and "q3" not in keys and len(set(keys)) == 23
    mix = TaskMix(tasks(spec(tmp_path / "chat.parquet"), validation_size=6))
    held = {prompt_key(t.checker["row"]["prompt"]) for t in mix.validation_tasks()}
    assert len(held) == 6 and not held & {prompt_key(t.checker["row"]["prompt"]) for t in all_training(mix)}
    assert prompt_key([{"role": "user", "content": "q"}]) == prompt_key("q") != prompt_key([system, {"role": "user",
                                                                                                    "content": "q"}])


def test_unusable_rows_and_max_rows(tmp_path, caplog):
    rows = [*sums(10), {"question": "", "answer": "1", "id": 10}, {"question": "No answer?", "answer": None, "id": 11}]
    write_jsonl(tmp_path / "gaps.jsonl", rows)
    mix = TaskMix(tasks(spec(tmp_path / "gaps.jsonl"), validation_size=2))
    assert mix.train_size(0) == 8 and all(t.question and t.answer for t in all_training(mix))
    assert "2 of 12 rows" in caplog.text
    capped = TaskMix(tasks(spec(tmp_path / "gaps.jsonl", source={"max_rows": 3}), validation_size=2))
    assert capped.train_size(0) == 3
    reward_only = TaskMix(tasks(spec(tmp_path / "gaps.jsonl", source={"answer": ""}, reward="my.mod:fn"),
                                validation_size=2))
    assert reward_only.train_size(0) == 9  # a reward function needs no answer; the empty prompt is still out


def test_training_index_skips_left_out_rows_exactly(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sums(200))
    split = DataSplit(spec(tmp_path / "s.jsonl"), tasks(validation_size=30), "test")
    split.train_size()
    left_out = set(split._left_out.tolist())
    assert len(left_out) == 30
    assert [split.row_index(j) for j in range(split.train_size())] == [i for i in range(200) if i not in left_out]
    with pytest.raises(IndexError):
        split.row_index(170)


def test_rows_are_read_only_when_asked_for(tmp_path, monkeypatch):
    n = 100_000
    table = pa.table({"prompt": pa.array([f"Problem number {i}: how much is {i} * 3?" for i in range(n)]),
                      "answer": pa.array([str(3 * i) for i in range(n)]), "difficulty": pa.array(np.arange(n) % 5)})
    pq.write_table(table, tmp_path / "big.parquet")
    read: list[int] = []
    row = DataSource.row
    monkeypatch.setattr(DataSource, "row", lambda self, i: read.append(i) or row(self, i))
    monkeypatch.setattr(DataSource, "values", _counting_values(DataSource.values, read))
    mix = TaskMix(tasks(spec(tmp_path / "big.parquet"), validation_size=8))
    assert mix.train_size(0) == n - 8
    # start-up read prompts only: of the held-out candidates, then of the rows whose fingerprint matched (the 8 held)
    assert len(read) <= (4 * 8 + 64) + 8
    assert len(mix.validation_tasks()) == 8
    read.clear()
    task = mix.train_problem(0, 77_777)
    assert read == [task.metadata["row_index"]]  # one row, read when asked for


def _counting_values(values, read):
    def counted(self, name, indices):
        read.extend(indices)
        return values(self, name, indices)

    return counted


def test_the_second_open_maps_the_same_cache(tmp_path):
    pq.write_table(pa.Table.from_pylist(verl_rows(5)), tmp_path / "v.parquet")
    first, second = check(spec(tmp_path / "v.parquet")), check(spec(tmp_path / "v.parquet"))
    assert first.dataset.cache_files == second.dataset.cache_files != []


# ----------------------------------------------------------------------------------------- errors


def one_line_error(config: TasksConfig) -> str:
    with pytest.raises(UserError) as err:
        mix = TaskMix(config)
        mix.train_size(0)
    text = str(err.value)
    assert "\n" not in text and text.startswith("tasks.mix[0]")
    return text


def test_missing_file_column_and_bad_format_are_one_line_user_errors(tmp_path):
    text = one_line_error(tasks(spec(tmp_path / "nope.jsonl")))
    assert "nope.jsonl: no such file or directory" in text
    write_jsonl(tmp_path / "s.jsonl", sums(10))
    text = one_line_error(tasks(spec(tmp_path / "s.jsonl", source={"prompt": "query"})))
    assert "s.jsonl: no column 'query' (columns: question, answer, id); set source.prompt" in text
    pq.write_table(pa.Table.from_pylist(verl_rows(3)), tmp_path / "v.parquet")
    text = one_line_error(tasks(spec(tmp_path / "v.parquet", source={"answer": "reward_model.truth"})))
    assert "no column 'reward_model.truth'" in text and "reward_model.ground_truth" in text
    write_jsonl(tmp_path / "nothing.jsonl", [{"text": "a"}])
    assert "no prompt column (looked for prompt, messages" in one_line_error(tasks(spec(tmp_path / "nothing.jsonl")))
    (tmp_path / "bad.parquet").write_text('{"question": "not parquet"}\n')
    assert "bad.parquet: cannot be read as parquet" in one_line_error(tasks(spec(tmp_path / "bad.parquet")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert "bad.jsonl: cannot be read as json" in one_line_error(tasks(spec(tmp_path / "bad.jsonl")))
    (tmp_path / "s.txt").write_text("x")
    assert "set source.format" in one_line_error(tasks(spec(tmp_path / "s.txt")))
    write_jsonl(tmp_path / "ints.jsonl", [{"prompt": i, "answer": "1"} for i in range(3)])
    assert "a prompt is a string or a chat list" in one_line_error(tasks(spec(tmp_path / "ints.jsonl")))
    assert "no answer column" in one_line_error(tasks(spec(tmp_path / "s.jsonl", source={"answer": ""})))
    assert "only 10 distinct usable prompts" in one_line_error(tasks(spec(tmp_path / "s.jsonl"), validation_size=11))
    assert "no rows of" in one_line_error(tasks(spec(tmp_path / "s.jsonl"), validation_size=10))


def test_config_refuses_what_a_data_source_cannot_have(tmp_path):
    toml = tmp_path / "run.toml"
    base = f'[[tasks.mix]]\nsource = {{path = "{tmp_path / "x.jsonl"}"}}\n'
    for extra, message in [("levels = [{}]", "a data source has no curriculum levels"),
                           ('curriculum = "on"', "a data source has no curriculum levels"),
                           ('domain = "logic"', "set reward")]:
        toml.write_text(base + extra + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(toml)
    toml.write_text(base)
    cfg = load_config(toml)
    assert (cfg.tasks.mix[0].domain, cfg.tasks.mix[0].name) == ("math", "x")
    toml.write_text(config_to_toml(cfg))  # the resolved config loads again (a built-in spec writes no source key)
    assert load_config(toml) == cfg and "source" not in config_to_toml(Config()).split("[tasks.mix.params]")[0]
    assert spec_levels(TaskSpec(name="chain_sum", source={"path": "x.jsonl"}), TasksConfig()) == [{}]


# ------------------------------------------------------------------------------------------ tasks


def test_task_round_trips_through_json_with_arrow_types(tmp_path):
    table = pa.table({
        "prompt": ["What is 6 * 7?", "What is 2 * 2?", "x?", "y?", "z?"],
        "answer": [42, 4, 1, 2, 3],
        "blob": pa.array([b"\x00\xff", b"ok", b"", b"", b""], pa.binary()),
        "when": pa.array([datetime.date(2024, 1, k + 1) for k in range(5)]),
        "tags": [["a", "b"], [], ["c"], [], []],
        "meta": [{"level": 3, "scores": [0.5, 1.0]}] * 5,
    })
    pq.write_table(table, tmp_path / "typed.parquet")
    mix = TaskMix(tasks(spec(tmp_path / "typed.parquet", reward="rewards.py:judge"), validation_size=1))
    for task in [*all_training(mix), *mix.validation_tasks()]:
        again = Task.from_dict(json.loads(json.dumps(task.to_dict())))
        assert again == task and task.checker["reward_fn"] == "rewards.py:judge"
    row = next(t for t in [*all_training(mix), *mix.validation_tasks()] if t.answer == "42").checker["row"]
    assert row["blob"] == "AP8=" and row["when"] == "2024-01-01" and row["meta"] == {"level": 3, "scores": [0.5, 1.0]}
    built_in = TaskMix(tasks(TaskSpec(domain="logic", name="chain_sum", reward="m:f"), train_size=10))
    assert built_in.train_problem(0, 0).checker["reward_fn"] == "m:f" and "row" not in built_in.train_problem(0, 0
                                                                                                            ).checker


def test_chat_prompt_renders_through_the_chat_template(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": f"Color number {i}?"}], "answer": "red"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    cfg = tasks(spec(tmp_path / "chat.parquet"), validation_size=1, system_prompt="ignored: the row has its own",
                prefill="<answer>")
    task = TaskMix(cfg).train_problem(0, 0)
    assert build_messages(task, cfg) == task.checker["row"]["prompt"]
    text = render_prompt(build_tiny_tokenizer(), task, cfg)
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nColor number")
    assert text.endswith("<|im_start|>assistant\n<answer>") and "ignored" not in text


def test_few_shot_only_for_string_prompts_with_an_answer(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sums(20))
    cfg = tasks(spec(tmp_path / "s.jsonl"), few_shot=2, answer_format="boxed")
    task = TaskMix(cfg).train_problem(0, 5)
    messages = build_messages(task, cfg)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("What is") and messages[1]["content"].startswith("\\boxed{")
    pq.write_table(pa.Table.from_pylist(verl_rows(20)), tmp_path / "v.parquet")  # one user message: as a string
    chat = tasks(spec(tmp_path / "v.parquet"), few_shot=2)
    assert len(build_messages(TaskMix(chat).train_problem(0, 5), chat)) == 5
    rows = [dict(r, prompt=[{"role": "system", "content": "Be exact."}, *r["prompt"]]) for r in verl_rows(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    chat = tasks(spec(tmp_path / "c.parquet"), few_shot=2)
    assert [m["role"] for m in build_messages(TaskMix(chat).train_problem(0, 5), chat)] == ["system", "user"]


def test_stem_rows_with_choices_and_index_answers(tmp_path):
    rows = [{"question": f"Which is the number {k}?", "choices": ["one", "two", "three", "four"], "answer": k % 4}
            for k in range(8)] + [{"question": "Bad?", "choices": ["a", "b"], "answer": 7}]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    cfg = tasks(spec(tmp_path / "mc.jsonl", domain="stem"), validation_size=1)
    mix = TaskMix(cfg)
    assert mix.train_size(0) == 7  # the bad index is left out
    task = next(t for t in all_training(mix) if t.checker["row"]["answer"] == 1)
    assert task.answer == "B" and task.checker["choices"] == ["one", "two", "three", "four"]
    assert "B. two" in build_messages(task, cfg)[-1]["content"]
    assert score("<answer>B</answer>", task) == (1.0, "correct")
    write_jsonl(tmp_path / "five.jsonl", [{"question": "q", "choices": list("abcde"), "answer": "E"}])
    assert "at most 4 choices" in one_line_error(tasks(spec(tmp_path / "five.jsonl", domain="stem")))


def test_code_rows_in_humaneval_schema(tmp_path):
    stub = 'def add(a, b):\n    """Return a + b."""\n'
    rows = [{"prompt": stub.replace("add", f"add{k}"), "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": f"add{k}", "canonical_solution": "    return a + b\n"} for k in range(4)]
    write_jsonl(tmp_path / "code.jsonl", rows)
    cfg = tasks(spec(tmp_path / "code.jsonl", domain="code", params={"timeout_s": 3}), validation_size=1)
    task = TaskMix(cfg).train_problem(0, 0)
    assert task.question == task.checker["row"]["prompt"] and task.checker["entry_point"].startswith("add")
    assert task.checker["limits"] == {"timeout_s": 3, "memory_mb": 512} and "```python" in build_messages(task, cfg)[0][
        "content"]
    write_jsonl(tmp_path / "mbpp.jsonl", [{"prompt": "Write add.", "test_list": ["assert add(1, 2) == 3"]}])
    assert "no column 'test', which code rows need" in one_line_error(tasks(spec(tmp_path / "mbpp.jsonl",
                                                                                  domain="code")))


def test_instruction_rows_in_ifeval_schema(tmp_path):
    rows = [{"key": k, "prompt": f"Write about topic {k} in lowercase letters only.",
             "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{"num_words": None}]}
            for k in range(4)]
    write_jsonl(tmp_path / "ifeval.jsonl", rows)
    task = TaskMix(tasks(spec(tmp_path / "ifeval.jsonl", domain="instruction"), validation_size=1)).train_problem(0, 0)
    assert task.checker["instruction_ids"] == ["change_case:english_lowercase"]
    assert score("all lowercase here.", task)[0] == 1.0 and score("Not Lowercase.", task)[0] == 0.0
    write_jsonl(tmp_path / "odd.jsonl", [dict(rows[0], instruction_id_list=["made:up"])])
    assert "made:up" in one_line_error(tasks(spec(tmp_path / "odd.jsonl", domain="instruction")))


def test_logic_needs_a_reward_function(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sums(10))
    with pytest.raises(ValueError, match="set reward"):
        spec(tmp_path / "s.jsonl", domain="logic")
    task = TaskMix(tasks(spec(tmp_path / "s.jsonl", domain="logic", reward="m:f"))).train_problem(0, 0)
    assert task.checker["reward_fn"] == "m:f" and task.metadata["messages"][0]["content"] == task.question


def test_module_exports_the_public_api():
    assert {"open_source", "check", "DataSource", "PROMPT_COLUMNS", "ANSWER_COLUMNS"} <= set(dir(data_module))
