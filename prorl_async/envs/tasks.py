"""Tasks: what a prompt asks and how its answer is checked, the task mix, and prompt rendering.

A :class:`Task` (defined in :mod:`prorl_async.envs.problem`, re-exported here) is plain data (strings, numbers,
lists, dicts): it pickles into a scoring process, and ``Task.from_dict(task.to_dict())`` rebuilds it.
``prorl_async.envs.score.score(text, task)`` scores it.

:class:`TaskMix` turns ``TasksConfig`` into two deterministic views per task spec:

- a **validation split** of ``validation_size`` distinct problems, held out;
- a **training split** of up to ``train_size`` problems whose questions are never in the validation
  split (compared by question text, so procedural generators with small problem spaces stay disjoint);

and a training stream ``train_task(i)``: draw i picks a spec by weight and a problem of its training
split, both from a RNG seeded by ``(seed, i)`` alone. Any process (generator, learner, a resumed run)
gets the same task for the same i, in O(1), without shared state. Splits depend on the seed and on the
spec's domain/name/params, not on its position in the mix.

A spec with a curriculum (:mod:`prorl_async.envs.curriculum`) also trains at harder **levels**: problem j of level
k > 0 (``train_problem(spec, j, level=k)``, any j of the training split's range) comes from level k's params and a
dataset seeded by ``(spec, "train", k, probe)``, with ids of its own (split ``train@k``) and ``level`` in its
metadata; it is still never a validation question. Level 0 is the spec's own params: the problems, ids and metadata
of before curricula. Validation is always level 0. Every level's params are checked when the mix is built.

A spec with a ``source`` (the user's own data set) takes its problems from :mod:`prorl_async.envs.data_split`
instead: the rows of its file, opened and checked when the mix is built, held out and scanned on first use, each
row read when its problem is asked for. Its tasks carry the row (``checker["row"]``) and the messages the model sees
(``metadata["messages"]``, sent as they are by :func:`build_messages`). A spec's ``reward`` (any spec) travels in
``checker["reward_fn"]``.

Usage::

    mix = TaskMix(cfg.tasks)
    task = mix.train_task(step * batch + k)
    prompt = render_prompt(tokenizer, task, cfg.tasks)  # chat template + cfg.tasks.prefill
    reward, reason = score(cfg.tasks.prefill + completion, task)
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prorl_async.envs.problem import FiniteProblems, Problem, ProceduralProblems, Task, derive_seed
from prorl_async.errors import UserError

if TYPE_CHECKING:
    from prorl_async.config import TasksConfig, TaskSpec
    from prorl_async.envs.data_split import DataSplit

_PROBES = 64  # procedural training: redraws allowed when a problem collides with the validation split
_VALIDATION_DRAWS = 4  # procedural validation: draws allowed per requested problem (+64) to find distinct ones


# ------------------------------------------------------------------------------------------- splits


def task_id(domain: str, name: str, spec_index: int, split: str, index: int) -> str:
    """A task's id (the wire's ``prompt_id``): its spec and its problem index in that spec's split."""
    return f"{domain}/{name}/{spec_index}/{split}/{index}"


class _Split:
    """Validation and training problems of one spec; built lazily, on first use."""

    def __init__(self, spec: TaskSpec, spec_index: int, cfg: TasksConfig) -> None:
        from prorl_async.envs.curriculum import spec_levels
        from prorl_async.envs.registry import problems_for

        self.spec, self.spec_index, self.cfg = spec, spec_index, cfg
        self.key = [cfg.seed, spec.domain, spec.name, spec.params]
        self.data: DataSplit | None = None  # a data source's rows (then ``source`` is an empty set, never read)
        if spec.source is not None:
            from prorl_async.envs.data_split import DataSplit

            self.data = DataSplit(spec, cfg, self.describe())
            self.source: FiniteProblems | ProceduralProblems = FiniteProblems(())
        else:
            self.source = problems_for(spec.domain, spec.name, spec.params)
        self.level_params = spec_levels(spec, cfg)  # level 0: spec.params; one level for a data source
        self._level_sources = [self.source, *(self._level_source(k) for k in range(1, len(self.level_params)))]
        self._validation: list[Task] | None = None
        self._held_out: set[str] = set()
        self._train_pool: list[Problem] | None = None  # finite sets
        self._makers: dict[tuple[int, int], Callable[[int], Problem]] = {}  # procedural: a dataset per (level, probe)
        self._shots: list[list[str]] | None = None  # few-shot demonstrations: [question, answer] pairs

    def describe(self) -> str:
        return f"tasks.mix[{self.spec_index}] ({self.spec.domain}/{self.spec.name})"

    def _level_source(self, level: int) -> ProceduralProblems:
        """The problems of curriculum level ``level`` > 0; a UserError naming the level for bad params."""
        from prorl_async.envs.registry import problems_for

        if isinstance(self.source, FiniteProblems):
            raise UserError(f"{self.describe()}: curriculum levels need a procedural task, this one is a fixed data "
                            "set (remove its levels)")
        params = self.level_params[level]
        try:
            source = problems_for(self.spec.domain, self.spec.name, params)
        except UserError as err:
            raise UserError(f"{self.describe()} curriculum level {level} (params {params}): {err}; fix the spec's "
                            'levels, or set its curriculum = "off"') from None
        assert isinstance(source, ProceduralProblems)
        return source

    def validation(self) -> list[Task]:
        if self._validation is None:
            self._build()
        assert self._validation is not None
        return self._validation

    def train_size(self) -> int:
        if self.data is not None:
            return self.data.train_size()
        self.validation()
        if isinstance(self.source, FiniteProblems):
            assert self._train_pool is not None
            return len(self._train_pool)
        return self.cfg.train_size

    def train(self, j: int, level: int = 0) -> Task:
        self.validation()
        if not 0 <= level < len(self.level_params):
            raise ValueError(f"{self.describe()} has {len(self.level_params)} curriculum levels (asked for {level})")
        if self.data is not None:
            return self._task(self.data.problem(j), "train", j)
        if isinstance(self.source, FiniteProblems):
            assert self._train_pool is not None
            return self._task(self._train_pool[j], "train", j)
        split = f"train@{level}" if level else "train"
        for probe in range(_PROBES):
            problem = self._maker(probe, level)(j)
            if problem.question not in self._held_out:
                return self._task(problem, split, j, level)
        raise RuntimeError(f"{self.describe()}: training problem {j} hit the validation split {_PROBES} times")

    def _maker(self, probe: int, level: int = 0) -> Callable[[int], Problem]:
        if (level, probe) not in self._makers:
            source = self._level_sources[level]
            assert isinstance(source, ProceduralProblems)
            seed = derive_seed(*self.key, "train", *((level,) if level else ()), probe)  # level 0: as before levels
            self._makers[(level, probe)] = source.make(seed, self.cfg.train_size)
        return self._makers[(level, probe)]

    def _build(self) -> None:
        size = self.cfg.validation_size
        if self.data is not None:
            self._validation = [self._task(p, "validation", i) for i, p in enumerate(self.data.validation())]
            return
        if isinstance(self.source, FiniteProblems):
            order = list(range(len(self.source.problems)))
            random.Random(derive_seed(*self.key, "order")).shuffle(order)
            held = self._distinct((self.source.problems[i] for i in order), size)
            self._held_out = {p.question for p in held}
            pool = [self.source.problems[i] for i in order if self.source.problems[i].question not in self._held_out]
            self._train_pool = pool[: self.cfg.train_size]
            if not self._train_pool:
                raise UserError(f"{self.describe()}: no problems left for training after {len(held)} held out; "
                                "lower tasks.validation_size")
        else:
            draws = _VALIDATION_DRAWS * size + 64
            item = self.source.make(derive_seed(*self.key, "validation"), draws) if size else None
            held = self._distinct((item(i) for i in range(draws)), size) if item else []
            self._held_out = {p.question for p in held}
        self._validation = [self._task(p, "validation", i) for i, p in enumerate(held)]

    def _distinct(self, problems, size: int) -> list[Problem]:
        held: list[Problem] = []
        seen: set[str] = set()
        for problem in problems:
            if len(held) == size:
                break
            if problem.question not in seen:
                seen.add(problem.question)
                held.append(problem)
        if len(held) < size:
            raise UserError(f"{self.describe()}: only {len(held)} distinct problems found for a validation split "
                            f"of {size}; lower tasks.validation_size or make the task harder (params)")
        return held

    def examples(self) -> list[list[str]]:
        """Candidates for ``cfg.few_shot`` demonstrations: the first ``few_shot + 1`` training problems that have a
        reference answer (and, for a data source, a prompt that is one user message: its text is shown as it is).
        A problem is shown the first ``few_shot`` of them that are not itself (:meth:`shots_for`)."""
        if self._shots is None:
            self._shots = []  # the demonstrations are tasks themselves: they carry none
            count = min(self.cfg.few_shot + 1, self.train_size())
            tasks = (self.train(j) for j in range(count))
            self._shots = [[_shown(t), t.answer] for t in tasks if t.answer is not None and _shown(t) is not None]
        return self._shots

    def shots_for(self, problem: Problem) -> list[list[str]]:
        """The demonstrations ``problem`` is shown: never its own question with its answer (a group that reads its
        answer in the prompt teaches nothing, and a validation score would count it)."""
        shown = _shown(problem)
        return [shot for shot in self.examples() if shot[0] != shown][: self.cfg.few_shot]

    def _task(self, problem: Problem, split: str, index: int, level: int = 0) -> Task:
        spec = self.spec
        shot = self.cfg.few_shot and problem.answer is not None and _shown(problem) is not None
        shots = {"few_shot": self.shots_for(problem)} if shot else {}
        levels = {"level": level} if level else {}  # level 0 tasks stay as they were before curricula
        reward = {"reward_fn": spec.reward} if spec.reward else {}
        return Task(
            id=task_id(spec.domain, spec.name, self.spec_index, split, index),
            domain=spec.domain,
            name=spec.name,
            question=problem.question,
            answer=problem.answer,
            checker={**problem.checker, "answer_format": self.cfg.answer_format,
                     "partial_credit": spec.partial_credit, **reward},
            metadata={**problem.metadata, **shots, "split": split, "index": index, "spec": self.spec_index, **levels},
        )


def _shown(problem: Problem | Task) -> str | None:
    """The question a few-shot demonstration shows: a built-in task's question (its domain's prompt dresses it), a
    data row's one user message as it is; None for a data row's chat of several messages (no demonstrations)."""
    messages = problem.metadata.get("messages")
    if messages is None:
        return problem.question
    if len(messages) == 1 and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str):
        return messages[0]["content"]
    return None


# ---------------------------------------------------------------------------------------------- mix


class TaskMix:
    """Deterministic, indexable training stream and held-out validation tasks for ``TasksConfig``.

    Building a mix loads each spec's data (and checks its name, its params and its curriculum levels' params) at
    once; a spec's validation split is generated the first time it is needed.
    """

    def __init__(self, cfg: TasksConfig) -> None:
        self.cfg = cfg
        self._splits = [_Split(spec, i, cfg) for i, spec in enumerate(cfg.mix)]
        weights = [spec.weight for spec in cfg.mix]
        self._cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]

    def __len__(self) -> int:
        """Number of task specs in the mix."""
        return len(self._splits)

    def train_task(self, index: int) -> Task:
        """Training draw ``index`` (any int >= 0): a spec by weight, then a problem of its training split."""
        if index < 0:
            raise ValueError(f"training index must be >= 0 (got {index})")
        rng = random.Random(derive_seed(self.cfg.seed, "draw", index))
        spec_index = bisect.bisect_right(self._cumulative, rng.random() * self._cumulative[-1])
        split = self._splits[min(spec_index, len(self._splits) - 1)]
        return split.train(rng.randrange(split.train_size()))

    def train_size(self, spec_index: int) -> int:
        """Problems in the training split of spec ``spec_index``."""
        return self._splits[spec_index].train_size()

    def train_problem(self, spec_index: int, j: int, level: int = 0) -> Task:
        """Problem ``j`` of spec ``spec_index``'s training split (``0 <= j < train_size(spec_index)``) at curriculum
        level ``level`` (``0 <= level < levels(spec_index)``; 0: the spec's own params)."""
        return self._splits[spec_index].train(j, level)

    def levels(self, spec_index: int) -> int:
        """Curriculum levels of spec ``spec_index``, level 0 included (1: it has no curriculum)."""
        return len(self._splits[spec_index].level_params)

    def level_params(self, spec_index: int, level: int) -> dict[str, Any]:
        """The params spec ``spec_index`` trains with at ``level``."""
        return dict(self._splits[spec_index].level_params[level])

    def validation_tasks(self, spec_index: int | None = None) -> list[Task]:
        """The held-out tasks of one spec, or of every spec in mix order."""
        if spec_index is not None:
            return list(self._splits[spec_index].validation())
        return [task for split in self._splits for task in split.validation()]


# ------------------------------------------------------------------------------------------ prompts


def build_messages(task: Task, cfg: TasksConfig) -> list[dict[str, Any]]:
    """Chat messages for ``task``: the optional system prompt, few-shot turns, then the question with its answer
    format; for a data row, its own messages (``metadata["messages"]``) as they are, after ``cfg.system_prompt``
    unless they have a system message of their own."""
    from prorl_async.envs.registry import domain_module

    turns: list[dict[str, Any]] | None = task.metadata.get("messages")
    module = domain_module(task.domain) if turns is None else None

    def ask(question: str) -> str:  # the user message of a question (a data row's: as it is)
        return module.prompt(replace(task, question=question), cfg.answer_format) if module else question

    if turns is None:
        turns = [{"role": "user", "content": ask(task.question)}]
    own_system = any(m.get("role") == "system" for m in turns)
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt and not own_system else []
    for question, answer in task.metadata.get("few_shot", []):
        shown = f"\\boxed{{{answer}}}" if cfg.answer_format == "boxed" else f"<answer>{answer}</answer>"
        messages += [{"role": "user", "content": ask(question)}, {"role": "assistant", "content": shown}]
    return [*messages, *(dict(m) for m in turns)]


def render_prompt(tokenizer: Any, task: Task, cfg: TasksConfig) -> str:
    """The prompt text: the model's chat template with the generation prompt, then ``cfg.prefill``."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; prompts are built with it")
    text = tokenizer.apply_chat_template(build_messages(task, cfg), tokenize=False, add_generation_prompt=True)
    return text + cfg.prefill
