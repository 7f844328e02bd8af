"""User reward functions: resolve a spec, call it as ``fn(completion, **row)``, judge what it returns.

A spec is ``package.module:function`` (imported as usual: the working directory is on ``sys.path``) or
``path/to/file.py:function`` (imported by path, relative to the working directory; the file's directory is
appended to ``sys.path`` so that it can import its neighbours). It names ``tasks.mix[i].reward``; the data source
puts it in each of that spec's tasks as ``task.checker["reward_fn"]``.

The contract (the scoring pool's workers, :mod:`prorl_async.envs.scoring_pool`, are the only callers):

- **Other trainers' functions.** One that names ``solution_str`` is verl's ``compute_score`` and is called as
  ``fn(data_source=, solution_str=completion, ground_truth=reward_model.ground_truth (or answer), extra_info=)``;
  one that names ``completions`` is TRL's and is called on a batch of one, ``fn(prompts=[row's prompt],
  completions=[completion], **{column: [value]})``, its list's one element taken.
- **Arguments.** ``fn(completion, **row)``: ``completion`` is the sample's text with the config's ``prefill``
  (what the built-in verifiers get), positionally. ``row`` is the data set row (``task.checker["row"]``: its
  columns, as read); a built-in task's row is :func:`row_of`'s ``prompt``, ``answer``, ``task_id``, ``domain``,
  ``task_name``, ``metadata``, ``checker``. A function with ``**kwargs`` gets every column; one without gets only
  the columns it names (``def reward(completion, answer)`` works on any row with an ``answer``). A column with the
  name of the first parameter is never passed (the completion holds that place).
- **Returns.** A number (``bool`` and 0-d numpy/torch values count), a ``(reward, reason)`` pair, or a dict with a
  numeric ``reward`` (or ``score``, as verl's ``compute_score`` returns), an optional ``reason`` and other named
  numbers: *extras*, never trained on; each generator
  reports ``reward_extras/<name>`` in its ``metrics.jsonl`` records, the mean over the training samples it sent
  since its previous record (validation samples left out). The reward is trained on as returned: unlike the
  built-in verifiers', it is not clipped to [0, 1]. An ``async def`` function (or any returned awaitable) runs to
  completion on the worker's one event loop, kept between calls.
- **Failures score 0 and the run goes on.** Each cause has a counter ``reward_<cause>`` (:data:`COUNTERS`) in
  the generator's records: ``raised``, ``nonfinite`` (NaN, inf), ``none``, ``not_number`` (a string, a dict
  without a numeric ``reward``, ...), ``timeout`` (past ``generator.reward_timeout_s``: the worker is killed),
  ``crash`` (the worker died), ``unloadable`` (the spec did not import in the worker). The first failure of each
  function for each cause is logged once per generator, with the function's spec (and the traceback when it
  raised); later ones are only counted.

``generator.reward_function`` (one function for every task without a ``reward_fn``, called as ``fn(text,
task_dict)``) may return the same values, may be async, and is counted by the same causes.

User code never runs in the trainer's processes: :func:`check` imports a spec in a child process.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from prorl_async.errors import UserError

CAUSES = ("raised", "nonfinite", "none", "not_number", "timeout", "crash", "unloadable")
"""Why a user reward function's sample scored 0."""
COUNTERS = tuple(f"reward_{cause}" for cause in CAUSES)
"""Their counter names, as they appear in the generator's records of ``metrics.jsonl``."""
EXTRAS_PREFIX = "reward_extras/"
"""Generator record key prefix of the extras' means: ``reward_extras/<name>``."""
MAX_EXTRAS = 32
"""Extras kept per sample, and distinct extra names reported per generator (the first ones seen)."""
MAX_EXTRA_NAME = 64
"""Longer extra names are left out."""
CHECK_TIMEOUT_S = 60.0
"""How long :func:`check` lets a spec's import run (a heavy library under load takes tens of seconds)."""


class Outcome(NamedTuple):
    """What a reward function's return value means: ``cause`` is empty when ``reward`` is the function's."""

    reward: float
    reason: str
    extras: dict[str, float]
    cause: str = ""


# --------------------------------------------------------------------------------------------- resolve


def parse(spec: str) -> tuple[str, str, bool]:
    """``(module or path, function name, is a file)``; UserError for a spec of neither form."""
    target, sep, name = spec.strip().rpartition(":")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not sep or not target or not name.isidentifier() or (not is_file and not _is_module_name(target)):
        raise UserError(f"reward function {spec!r} must be 'package.module:function' or 'path/to/file.py:function'")
    return target, name, is_file


def _is_module_name(target: str) -> bool:
    return all(part.isidentifier() for part in target.split("."))


def load(spec: str) -> Callable[..., Any]:
    """Import ``spec``'s module (or file) and return its function. Raises UserError for a malformed spec, a missing
    file or a name that is not a callable; the module's own exceptions propagate (the caller words them)."""
    target, name, is_file = parse(spec)
    module = _import_file(spec, target) if is_file else importlib.import_module(target)
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"reward function {spec!r}: {target} has no {name}")
    if not callable(fn):
        raise UserError(f"reward function {spec!r}: {name} is a {type(fn).__name__}, not a callable")
    return fn


def _import_file(spec: str, target: str) -> Any:
    path = Path(target)
    if not path.is_file():
        raise UserError(f"reward function {spec!r}: no file {target} (relative to {os.getcwd()})")
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_prorl_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"reward function {spec!r}: {target} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # its neighbours import; appended: it never shadows an installed module
    sys.modules[name] = module  # before running it: dataclasses and pickle look their module up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class RewardFunction:
    """A loaded spec, called as ``fn(completion, **row)`` with the row filtered to its parameters (module docstring).

    Usage (in a scoring worker)::

        fn = RewardFunction("examples/own_data/reward.py:reward")
        fn("<answer>12", {"question": "...", "answer": "12"})   # what it returned (a coroutine run to completion)
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = load(spec)
        self.style = _style(self.fn)
        self.first, self.accepts = (None, None) if self.style != "row" else _parameters(spec, self.fn)

    def __call__(self, completion: str, row: Mapping[str, Any]) -> Any:
        if self.style == "verl":
            return resolve_awaitable(self.fn(**_verl_arguments(completion, row)))
        if self.style == "trl":
            lists = {k: [v] for k, v in row.items() if k not in ("prompts", "completions")}
            out = resolve_awaitable(self.fn(prompts=[row.get("prompt")], completions=[completion], **lists))
            return out[0] if isinstance(out, list | tuple) and len(out) == 1 else out
        kwargs = {k: v for k, v in row.items() if k != self.first and (self.accepts is None or k in self.accepts)}
        return resolve_awaitable(self.fn(completion, **kwargs))


def _style(fn: Callable[..., Any]) -> str:
    """How to call ``fn``: ``verl`` (``compute_score(data_source, solution_str, ground_truth, extra_info)``: it names
    ``solution_str``), ``trl`` (``reward(prompts, completions, **kwargs) -> list``: it names ``completions``), else
    ``row``: ``fn(completion, **row)``."""
    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "row"
    if "solution_str" in names:
        return "verl"
    if "completions" in names:
        return "trl"
    return "row"


def _verl_arguments(completion: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """verl's ``compute_score`` keywords from a row of its schema (``data_source``, ``reward_model.ground_truth``,
    ``extra_info``); a row of another schema gives its ``answer`` as the ground truth."""
    model = row.get("reward_model")
    truth = model.get("ground_truth") if isinstance(model, Mapping) else row.get("answer")
    return {"data_source": row.get("data_source"), "solution_str": completion, "ground_truth": truth,
            "extra_info": row.get("extra_info")}


def _parameters(spec: str, fn: Callable[..., Any]) -> tuple[str | None, frozenset[str] | None]:
    """(name of the parameter the completion fills, names a row may fill; None: any, the function has ``**``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: pass the whole row
        return None, None
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind is kinds.VAR_POSITIONAL for p in params):
        raise UserError(f"reward function {spec!r} must take the completion as its first positional parameter")
    first = positional[0].name if positional else None
    if any(p.kind is kinds.VAR_KEYWORD for p in params):
        return first, None
    return first, frozenset(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY))


_loop: asyncio.AbstractEventLoop | None = None


def resolve_awaitable(out: Any) -> Any:
    """``out``, or what it resolves to when it is awaitable: run on one loop per process, so that clients an async
    reward function keeps between calls (an HTTP session) stay bound to a live loop."""
    global _loop
    if not inspect.isawaitable(out):
        return out
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(out)


def row_of(task: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a reward function for ``task`` (a ``Task.to_dict()``): its data set row, or for a
    built-in task ``prompt`` (the question), ``answer`` (the reference, may be None), ``task_id``, ``domain``,
    ``task_name``, ``metadata`` and ``checker`` (what the domain's verifier reads, ``reward_fn`` left out)."""
    checker = task.get("checker") or {}
    row = checker.get("row")
    if isinstance(row, dict):
        return dict(row)
    return {"prompt": task.get("question"), "answer": task.get("answer"), "task_id": task.get("id"),
            "domain": task.get("domain"), "task_name": task.get("name"), "metadata": dict(task.get("metadata") or {}),
            "checker": {k: v for k, v in checker.items() if k != "reward_fn"}}


# ------------------------------------------------------------------------------------------ interpret


def interpret(out: Any) -> Outcome:
    """What a reward function returned, as a reward (0 with a cause when it is no finite number; module docstring)."""
    reason, extras = "", {}
    if isinstance(out, tuple) and len(out) == 2:
        out, reason = out[0], str(out[1])
    if isinstance(out, Mapping):
        key = "reward" if "reward" in out else "score" if "score" in out else None  # "score": verl's compute_score
        if key is None:
            return _failed("not_number", f"returned a dict without 'reward' (keys {_keys(out)})")
        reason = str(out["reason"]) if isinstance(out.get("reason"), str) else reason
        extras = extras_of(out, key)
        out = out[key]
    if out is None:
        return _failed("none", "returned None")
    reward = _number(out)
    if reward is None:
        return _failed("not_number", f"returned a {type(out).__name__}, not a number: {_short(out)}")
    if not math.isfinite(reward):
        return _failed("nonfinite", f"returned {reward}")
    return Outcome(reward, reason[:500], extras)


def extras_of(out: Mapping[str, Any], reward_key: str = "reward") -> dict[str, float]:
    """The finite numbers of a returned dict besides its reward (``reward_key``; bools as 0/1); anything else is
    left out."""
    extras: dict[str, float] = {}
    for key, value in out.items():
        if len(extras) == MAX_EXTRAS:
            break
        if key in (reward_key, "reason") or not isinstance(key, str) or not 0 < len(key) <= MAX_EXTRA_NAME:
            continue
        number = _number(value)
        if number is not None and math.isfinite(number):
            extras[key] = number
    return extras


def _number(value: Any) -> float | None:
    """``value`` as a float: a real number, a bool, or a 0-d array or tensor (numpy's ``bool_``, ``torch.tensor(1.)``)
    of one; None for anything else."""
    item = getattr(value, "item", None)
    if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) == 0 and callable(item):
        try:
            value = item()
        except Exception:
            return None
    return float(value) if isinstance(value, numbers.Real) else None


def _failed(cause: str, reason: str) -> Outcome:
    return Outcome(0.0, reason, {}, cause)


def _keys(out: Mapping[str, Any]) -> str:
    return ", ".join(map(str, list(out)[:8])) or "none"


def _short(value: Any) -> str:
    return " ".join(repr(value).split())[:100]


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------- extras


class ExtrasTotals:
    """Sums and counts of the extras per name, thread-safe: the loop adds, the status thread reads.

    Usage::

        totals = ExtrasTotals()
        totals.add({"formatted": 1.0})
        now = totals.snapshot()
        window_means(now, before)    # {"reward_extras/formatted": mean since `before`}; then before = now
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, tuple[float, int]] = {}

    def add(self, extras: Mapping[str, float]) -> None:
        with self._lock:
            for name, value in extras.items():
                if name in self._totals or len(self._totals) < MAX_EXTRAS:
                    total, n = self._totals.get(name, (0.0, 0))
                    self._totals[name] = (total + value, n + 1)

    def snapshot(self) -> dict[str, tuple[float, int]]:
        with self._lock:
            return dict(self._totals)


def window_means(now: Mapping[str, tuple[float, int]], before: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    """``reward_extras/<name>``: the mean of the values added between two snapshots; names without one left out."""
    means = {}
    for name, (total, n) in now.items():
        total0, n0 = before.get(name, (0.0, 0))
        if n > n0:
            means[EXTRAS_PREFIX + name] = (total - total0) / (n - n0)
    return means


# ----------------------------------------------------------------------------------------------- check


def check(spec: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise a one-line UserError unless ``spec`` imports and names a callable that takes a positional completion.

    For ``prorl-async run`` at start-up and ``prorl-async data``, before any worker starts. The import runs in a
    child process under ``timeout_s`` (the reward's code never runs in the caller's process; a hang is an error).
    Parsing and a missing file are reported without a child. The function is not called.
    """
    _, _, is_file = parse(spec)
    if is_file:
        target = spec.strip().rpartition(":")[0]
        if not Path(target).is_file():
            raise UserError(f"reward function {spec!r}: no file {target} (relative to {os.getcwd()})")
    cmd = [sys.executable, "-m", "prorl_async.envs.rewards", spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # subprocess.run killed its child
        raise UserError(f"reward function {spec!r}: importing it took over {timeout_s:g} s") from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if done.returncode == 0 and answer.get("ok"):
        return
    if isinstance(answer.get("error"), str):
        raise UserError(answer["error"])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    raise UserError(f"reward function {spec!r}: the import check exited with code {done.returncode}: {last}")


def _check_main(spec: str) -> int:
    """The child of :func:`check`: one JSON line on stdout, the module's own output moved to stderr."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        RewardFunction(spec)
        error = None
    except UserError as err:
        error = " ".join(str(err).split())
    except BaseException as err:  # SystemExit, KeyboardInterrupt of a module: still one line
        target = spec.rpartition(":")[0]
        error = f"reward function {spec!r}: importing {target} failed: {one_line(err)}"
    answers.write(json.dumps({"ok": error is None, "error": error}) + "\n")
    answers.flush()
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(_check_main(sys.argv[1]))
