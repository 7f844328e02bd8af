"""Data splits: a data source's rows as held-out and training problems (what ``TaskMix`` uses for a source spec).

The rows come from :mod:`prorl_async.envs.data`. Start-up scans the prompt column (and the columns the verifier
reads, for empty values) as Arrow arrays, chunk by chunk, with no Python object per row; a row becomes a
:class:`~prorl_async.envs.tasks.Problem` only when that problem is asked for.

**Splits** (:class:`DataSplit`):

- validation: ``tasks.validation_size`` rows of distinct prompts, in an order seeded by ``(tasks.seed, path,
  split)``, from ``validation_path`` (or the ``validation_split`` of a directory; fewer if it has fewer), else from
  the rows of ``path``;
- training: every row of ``path`` in file order, but those whose prompt is a held-out prompt and the unusable ones
  (an empty prompt, an empty value the verifier reads: logged with their count); at most ``source.max_rows``.
  ``tasks.train_size`` does not cut a data source;
- prompts compare by their key (:func:`prompt_key`): the text of a string prompt or of a chat prompt that is one
  user message, else the canonical JSON of the messages. The scan compares a vectorised fingerprint (the messages'
  contents, joined), then the keys of the few rows whose fingerprint matches;
- training problem j is row ``j + (left-out rows before it)``: the left-out rows are one sorted array, however large
  the data set;
- no curriculum levels (:func:`~prorl_async.envs.curriculum.spec_levels` gives one); prompt skipping applies.

**Problems**: a row's problem has its columns, JSON-able, in ``checker["row"]`` (a ``reward`` function is called as
``fn(completion, **row)``), the reference answer in ``answer``, and the user-side messages the model sees in
``metadata["messages"]`` (``build_messages`` sends them as they are): the prompt as it is, a string as one user
message. Only where a domain's verifier needs its own prompt does a row get the built-in task's form: ``code`` rows
(HumanEval's schema: ``prompt`` is the function's stub, asked as the built-in task asks it) and ``stem`` rows with
``choices`` after a string prompt (listed with their letters). ``question`` is the text of the last user message.
With ``reward`` set the prompt is always used as it is.

Usage::

    split = DataSplit(spec, cfg.tasks, label="tasks.mix[0] (math/gsm8k)")   # opens and checks the data
    held = split.validation()             # [Problem], held out
    problem = split.problem(j)            # 0 <= j < split.train_size(): one row, read now
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prorl_async.envs.data import DataSource, answer_text, is_list, is_text, lookup, needs, open_checked
from prorl_async.envs.problem import Problem, Task, derive_seed
from prorl_async.errors import UserError

if TYPE_CHECKING:
    from prorl_async.config import TasksConfig, TaskSpec

log = logging.getLogger("prorl_async.envs.data_split")

_CHAT_KEY = "\x1e"  # starts the key of a chat prompt other than one user message: no text prompt starts with it
_JOIN = "\x1f"  # joins a chat prompt's contents into its fingerprint
_LETTER = r"^\s*(\(?[A-Da-d]\)?[.:)]?|[0-3])\s*$"  # a stem answer: a letter A-D or a 0-based index


# ------------------------------------------------------------------------------------------- splits


class DataSplit:
    """The held-out problems and the training rows of one source spec (module docstring, **Splits**).

    Opening (at construction) resolves the columns and checks the domain's needs; the scans and the held-out
    rows wait for the first :meth:`validation`, :meth:`train_size` or :meth:`problem`.
    """

    def __init__(self, spec: TaskSpec, cfg: TasksConfig, label: str) -> None:
        self.spec, self.cfg, self.label = spec, cfg, label
        try:
            self.source, self.held_source = open_checked(spec)
        except UserError as err:
            raise UserError(f"{label}: {err}") from None
        self._left_out: np.ndarray | None = None  # sorted rows of ``source`` that training skips
        self._shift = np.empty(0, np.int64)  # left_out[i] - i: how many training rows come before left-out row i
        self._size = 0
        self._held: list[int] = []  # rows of ``held_source``, in held-out order

    def validation(self) -> list[Problem]:
        self._build()
        return [self._problem(self.held_source, i) for i in self._held]

    def train_size(self) -> int:
        self._build()
        return self._size

    def row_index(self, j: int) -> int:
        """The row of ``source`` that is training problem ``j``."""
        self._build()
        if not 0 <= j < self._size:
            raise IndexError(f"{self.label}: training problem {j} of {self._size}")
        return j + int(np.searchsorted(self._shift, j, side="right"))

    def problem(self, j: int) -> Problem:
        return self._problem(self.source, self.row_index(j))

    def _build(self) -> None:
        if self._left_out is not None:
            return
        size, source, held_source = self.cfg.validation_size, self.source, self.held_source
        unusable = _unusable(source, self.spec)
        held_unusable = unusable if held_source is source else _unusable(held_source, self.spec)
        seed = derive_seed(self.cfg.seed, "data", str(held_source.path), held_source.split, "validation")
        self._held, keys, prints = _pick_held(held_source, size, seed, held_unusable)
        if held_source is source and len(self._held) < size:
            raise UserError(f"{self.label}: only {len(self._held)} distinct usable prompts in {source.path} for a "
                            f"validation split of {size}; lower tasks.validation_size, or set source.validation_path")
        if size and not self._held:
            raise UserError(f"{self.label}: no usable rows in {held_source.path} to hold out; check it, or leave "
                            "source.validation_path empty")
        matches = _matching(source, keys, prints)
        self._left_out = np.union1d(unusable, matches).astype(np.int64)
        self._shift = self._left_out - np.arange(len(self._left_out), dtype=np.int64)
        kept = source.num_rows - len(self._left_out)
        max_rows = self.spec.source.max_rows if self.spec.source else 0
        self._size = min(kept, max_rows) if max_rows else kept
        if not self._size:
            raise UserError(f"{self.label}: no rows of {source.path} left for training ({len(unusable)} unusable, "
                            f"{len(matches)} with a held-out prompt); check the file, or lower tasks.validation_size")
        if len(unusable):
            columns = ", ".join((source.prompt, *needs(source, self.spec)))
            log.warning("%s: %d of %d rows of %s left out: nothing usable in %s", self.label, len(unusable),
                        source.num_rows, source.path, columns)
        log.info("%s: %s: %d rows, %d held out, %d training", self.label, source.path, source.num_rows,
                 len(self._held), self._size)

    def _problem(self, source: DataSource, index: int) -> Problem:
        row = source.row(index)
        messages = _messages(lookup(row, source.prompt))
        answer = answer_text(lookup(row, source.answer)) if source.answer else None
        question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        problem = Problem(question=question, answer=answer, checker={"row": row},
                          metadata={"source": str(source.path), "row_index": index, "messages": messages})
        form = None if self.spec.reward else _FORMS.get(self.spec.domain)
        return form(problem, row, self.spec, self.cfg, source.chat) if form else problem


# ------------------------------------------------------------------------------------------ scanning


def _unusable(source: DataSource, spec: TaskSpec) -> np.ndarray:
    """Rows with an empty prompt, or an empty value the verifier needs (a stem answer: not a letter or index)."""
    found = [_where(source, source.prompt, lambda c: _blank(_fingerprints(c, source.chat)))]
    for name in needs(source, spec):
        stem_answer = spec.domain == "stem" and name == source.answer
        found.append(_where(source, name, _bad_letter if stem_answer else _blank))
    return np.unique(np.concatenate(found))


def _where(source: DataSource, name: str, test: Any) -> np.ndarray:
    """Rows where ``test(chunk)`` (a boolean array; null counts as true) holds, over column ``name``."""
    hits, offset = [], 0
    for chunk in source.chunks(name):
        mask = pc.fill_null(test(chunk), True)
        hits.append(pc.indices_nonzero(mask).to_numpy().astype(np.int64) + offset)
        offset += len(chunk)
    return np.concatenate(hits) if hits else np.empty(0, np.int64)


def _blank(chunk: pa.Array) -> pa.Array:
    if is_text(chunk.type):
        return pc.equal(pc.utf8_length(chunk), 0)
    if is_list(chunk.type):
        return pc.equal(pc.list_value_length(chunk), 0)
    return pc.is_null(chunk)


def _bad_letter(chunk: pa.Array) -> pa.Array:
    if pa.types.is_integer(chunk.type):
        return pc.invert(pc.and_(pc.greater_equal(chunk, 0), pc.less_equal(chunk, 3)))
    return pc.invert(pc.match_substring_regex(chunk, _LETTER))


def _fingerprints(chunk: pa.Array, chat: bool) -> pa.Array:
    """A string per row that equal prompt keys share: the text, or a chat prompt's contents joined (vectorised)."""
    if not chat:
        return chunk
    contents = chunk.values.field("content")  # the list's offsets index the unsliced values
    lists = type(chunk).from_arrays(chunk.offsets, contents, mask=chunk.is_null())
    return pc.binary_join(lists, _JOIN)


def _pick_held(source: DataSource, size: int, seed: int, unusable: np.ndarray
               ) -> tuple[list[int], set[str], set[str]]:
    """``size`` usable rows of distinct prompts in a seeded order: their indices, keys and fingerprints."""
    held: list[int] = []
    keys: set[str] = set()
    prints: set[str] = set()
    if not size:
        return held, keys, prints
    rng = random.Random(seed)
    n = source.num_rows
    first = rng.sample(range(n), min(n, 4 * size + 64))

    def take(indices: Sequence[int]) -> bool:
        indices = [i for i in indices if not _member(unusable, i)]
        for i, value in zip(indices, source.values(source.prompt, indices), strict=True):
            key = prompt_key(value)
            if key is not None and key not in keys:
                keys.add(key)
                prints.add(fingerprint(value))
                held.append(i)
                if len(held) == size:
                    return True
        return False

    if not take(first) and len(first) < n:  # many duplicates: walk the other rows too, in a seeded order
        chosen = set(first)
        rest = [i for i in range(n) if i not in chosen]
        rng.shuffle(rest)
        for start in range(0, len(rest), 65536):
            if take(rest[start : start + 65536]):
                break
    return held, keys, prints


def _member(sorted_rows: np.ndarray, row: int) -> bool:
    at = int(np.searchsorted(sorted_rows, row))
    return at < len(sorted_rows) and int(sorted_rows[at]) == row


def _matching(source: DataSource, keys: set[str], prints: set[str]) -> np.ndarray:
    """Rows of ``source`` whose prompt key is one of ``keys``: fingerprints vectorised, then keys of the hits."""
    if not keys:
        return np.empty(0, np.int64)
    value_set = pa.array(sorted(prints), pa.string())

    def hit(chunk: pa.Array) -> pa.Array:
        found = _fingerprints(chunk, source.chat)
        return pc.fill_null(pc.is_in(found, value_set=value_set.cast(found.type)), False)

    candidates = _where(source, source.prompt, hit)
    values = source.values(source.prompt, candidates.tolist())
    return np.array([i for i, v in zip(candidates.tolist(), values, strict=True) if prompt_key(v) in keys], np.int64)


# --------------------------------------------------------------------------------------------- rows


def prompt_key(prompt: Any) -> str | None:
    """What prompts compare by: a string's text, a chat prompt's one user message, else ``\\x1e`` + the canonical
    JSON of its messages; None for an empty prompt."""
    if prompt is None or isinstance(prompt, str):
        return prompt or None
    messages = _messages(prompt)
    if not messages:
        return None
    if len(messages) == 1 and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str):
        return messages[0]["content"] or None
    return _CHAT_KEY + json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def fingerprint(prompt: Any) -> str:
    """The Python twin of :func:`_fingerprints` for one prompt."""
    if isinstance(prompt, str):
        return prompt
    return _JOIN.join(str(m.get("content")) for m in prompt)


def _messages(prompt: Any) -> list[dict[str, Any]]:
    """The chat messages of a prompt: a string as one user message; a chat list's messages without the empty keys
    Arrow adds where messages differ in their keys."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{k: v for k, v in message.items() if v is not None} for message in prompt or []]


# ------------------------------------------------------------------------------------- domain forms


def _stem_problem(problem: Problem, row: dict[str, Any], spec: TaskSpec, cfg: TasksConfig, chat: bool) -> Problem:
    from prorl_async.envs.domains import stem

    raw = row.get("choices")
    choices = raw.get("text") if isinstance(raw, dict) else raw
    choices = [str(c) for c in choices] if isinstance(choices, list) else []
    text = (problem.answer or "").strip().strip("().:").strip()
    letter = stem.LETTERS[int(text)] if text.isdigit() and int(text) < 4 else text.upper()
    messages = problem.metadata["messages"]
    if choices and not chat:  # a string prompt: the choices follow it, as in the built-in task
        shown = stem.prompt(_as_task(problem, "stem", choices=choices), cfg.answer_format)
        messages = [{"role": "user", "content": shown}]
    return Problem(problem.question, letter, {**problem.checker, "choices": choices},
                   {**problem.metadata, "messages": messages})


def _code_problem(problem: Problem, row: dict[str, Any], spec: TaskSpec, cfg: TasksConfig, chat: bool) -> Problem:
    from prorl_async.envs.domains import code

    if "entry_point" not in row:  # input/output tests in the answer (code_io): the prompt is the row's, as it is
        from prorl_async.envs.domains import code_io

        limits = {**code_io.PARAMS, **spec.params}
        return Problem(problem.question, problem.answer, {**problem.checker, "io_tests": problem.answer,
                                                          "limits": limits}, problem.metadata)
    limits = {**code._PARAMS, **spec.params}
    checker = {**problem.checker, "test": row["test"], "entry_point": row["entry_point"], "limits": limits}
    shown = code.prompt(_as_task(problem, "code"), cfg.answer_format)
    return Problem(problem.question, problem.answer, checker,
                   {**problem.metadata, "messages": [{"role": "user", "content": shown}]})


def _instruction_problem(problem: Problem, row: dict[str, Any], spec: TaskSpec, cfg: TasksConfig,
                         chat: bool) -> Problem:
    kwargs = row.get("kwargs") or []
    if isinstance(kwargs, str):  # some exports keep the list as one JSON string
        kwargs = json.loads(kwargs)
    kwargs = [json.loads(k) if isinstance(k, str) else (k or {}) for k in kwargs]
    checker = {**problem.checker, "instruction_ids": list(row["instruction_id_list"]), "kwargs": kwargs}
    return Problem(problem.question, problem.answer, checker, problem.metadata)


def _as_task(problem: Problem, domain: str, **checker: Any) -> Task:
    return Task(id="", domain=domain, name="", question=problem.question, answer=problem.answer,
                checker={**problem.checker, **checker})


_FORMS = {"stem": _stem_problem, "code": _code_problem, "instruction": _instruction_problem}  # the rest: as they are
