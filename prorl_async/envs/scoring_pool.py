"""Scoring off the event loop: a pool of worker processes, one sample per request, each under a timeout.

Invariants:

- :meth:`ScoringPool.score` never raises for a bad reward: a reward function that raises scores 0 with the
  error as reason (``status="error"``); one that returns no finite number (:func:`prorl_async.envs.rewards.interpret`)
  scores 0 (``"error"``); one that runs past ``timeout_s`` scores 0 (``"timeout"``) and its worker is killed and
  replaced; a worker that dies scores 0 (``"crash"``) and is replaced. Every status is counted in
  :attr:`ScoringPool.counters`; a user function's zero scores also by cause in :attr:`ScoringPool.reasons`
  (``reward_raised``, ...: :data:`prorl_async.envs.rewards.COUNTERS`).
- Which function scores a task: ``task["checker"]["reward_fn"]`` (a spec's ``reward``, called as
  ``fn(completion, **row)``: :mod:`prorl_async.envs.rewards`) when set, else ``reward_function`` (called as
  ``fn(text, task_dict)``) when set, else the built-in verifier (:func:`prorl_async.envs.score.score`). A worker
  imports each ``reward_fn`` once: at start for those of ``warm_tasks`` (an import that fails there fails
  :meth:`start`), lazily for others. Both kinds of user function may return a dict with extras (in
  :attr:`ScoreResult.extras`) and may be ``async``.
- The first failure of each user function for each cause is logged once per pool (the traceback when it raised,
  with the function's name); later ones are only counted. With several generators, once per generator.
- Nothing is pickled. A worker is ``python -m prorl_async.envs.scoring_pool`` started by this pool; requests and
  answers are length-prefixed JSON over its stdin and stdout (the worker moves ``print`` output of reward
  code to stderr, so that stdout carries only answers). Tasks travel as ``Task.to_dict()``.
- The timeout runs from the request written to the answer read: a worker is used only once it has said it
  is ready: its imports are done, the ``reward_fn`` of each ``warm_tasks`` entry is imported and the built-in
  verifier has scored each other entry once (the verifiers import their libraries lazily; under load that first
  use alone can take seconds).
- A request cancelled while a worker scores it (its group was aborted) kills that worker: an answer that
  nobody reads must not be taken as the answer to the next request.

Usage (inside an asyncio loop)::

    pool = ScoringPool(workers=2, timeout_s=10, warm_tasks=[task.to_dict()])
    await pool.start()                       # raises ScoringError if a worker cannot start
    result = await pool.score("<answer>7</answer>", task.to_dict())  # ScoreResult(1.0, "correct", "ok")
    await pool.close()
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from prorl_async.envs import rewards
from prorl_async.errors import UserError

log = logging.getLogger(__name__)

STATUSES = ("ok", "error", "timeout", "crash")
_HEADER = struct.Struct("<I")
_MAX_FRAME = 64 << 20


class ScoringError(UserError, RuntimeError):
    """The pool could not start a worker (a reward function that cannot be imported, a worker that dies at once)."""


class ScoreResult(NamedTuple):
    reward: float
    reason: str
    status: str  # one of STATUSES
    extras: Mapping[str, float] = MappingProxyType({})
    """A user function's extra named scores (never the training reward)."""
    cause: str = ""
    """Why a user function's sample scored 0 (one of ``rewards.CAUSES``); empty otherwise."""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        data = json.dumps(payload).encode()
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        await self.proc.stdin.drain()
        return await _read_frame(self.proc.stdout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()  # a process this pool started
        await self.proc.wait()


async def _read_frame(reader: asyncio.StreamReader | None) -> dict[str, Any]:
    assert reader is not None
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_FRAME:
        raise ValueError(f"worker answer of {size} bytes")
    answer = json.loads(await reader.readexactly(size))
    if not isinstance(answer, dict):
        raise ValueError("worker answer is not a map")
    return answer


class ScoringPool:
    """``workers`` scoring processes; :meth:`score` hands one sample to an idle one (module docstring)."""

    def __init__(self, workers: int, timeout_s: float, reward_function: str = "",
                 warm_tasks: Sequence[dict[str, Any]] = (), start_timeout_s: float = 120.0) -> None:
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"need workers >= 1 and timeout_s > 0 (got {workers}, {timeout_s})")
        self.workers, self.timeout_s = workers, timeout_s
        self.reward_function, self.warm_tasks = reward_function, list(warm_tasks)
        self.start_timeout_s = start_timeout_s
        self.counters: Counter[str] = Counter({s: 0 for s in STATUSES})
        self.reasons: Counter[str] = Counter(dict.fromkeys(rewards.COUNTERS, 0))
        self._logged: set[tuple[str, str]] = set()  # (function, cause) whose first failure was logged
        self.score_seconds = 0.0
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._launched: list[_Worker] = []
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def idle_workers(self) -> int:
        """Workers ready for a request now."""
        return self._idle.qsize()

    async def launch(self) -> None:
        """Start the worker processes without waiting for them: they import while the caller does other work."""
        if not self._launched:
            self._launched = [await self._launch_one() for _ in range(self.workers)]

    async def start(self) -> None:
        """Start every worker (if :meth:`launch` did not) and wait until each is ready."""
        await self.launch()
        launched, self._launched = self._launched, []
        workers = await asyncio.gather(*(self._ready(w) for w in launched), return_exceptions=True)
        errors = [w for w in workers if isinstance(w, BaseException)]
        for w in workers:
            if isinstance(w, _Worker):
                self._idle.put_nowait(w)
        if errors:
            await self.close()
            raise errors[0]

    async def _launch_one(self) -> _Worker:
        cmd = [sys.executable, "-m", "prorl_async.envs.scoring_pool", "--timeout-s", repr(self.timeout_s),
               "--reward-function", self.reward_function]
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        worker = _Worker(proc)
        self._all.add(worker)
        assert proc.stdin is not None
        data = json.dumps(self.warm_tasks).encode()  # the first frame: tasks to warm the verifiers with
        proc.stdin.write(_HEADER.pack(len(data)) + data)
        return worker

    async def _spawn(self) -> _Worker:
        return await self._ready(await self._launch_one())

    async def _ready(self, worker: _Worker) -> _Worker:
        try:
            hello = await asyncio.wait_for(_read_frame(worker.proc.stdout), self.start_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, ValueError) as err:
            await self._discard(worker)
            raise ScoringError(f"a scoring worker did not start within {self.start_timeout_s:g} s: {err!r}") from None
        if not hello.get("ready"):
            await self._discard(worker)
            raise ScoringError(f"scoring worker failed to start: {hello.get('error', hello)}")
        return worker

    async def _discard(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await worker.kill()

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` and start a replacement in the background (scoring goes on with the others)."""
        self.counters["replaced"] += 1

        async def replace() -> None:
            await self._discard(worker)
            while not self._closed:
                try:
                    self._idle.put_nowait(await self._spawn())
                    return
                except ScoringError as err:  # keep trying: a pool without workers would stall the generator
                    log.error("scoring: replacing a worker failed, retrying in 1 s: %s", err)
                    await asyncio.sleep(1.0)

        task = asyncio.get_running_loop().create_task(replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def score(self, text: str, task: dict[str, Any]) -> ScoreResult:
        """Score one sample; never raises for what the reward function does (module docstring)."""
        if self._closed:
            raise RuntimeError("scoring pool is closed")
        worker = await self._idle.get()
        start = time.perf_counter()
        user_fn = _user_function(task, self.reward_function)
        answer: dict[str, Any] = {}
        try:
            answer = await asyncio.wait_for(worker.request({"text": text, "task": task}), self.timeout_s)
            result = _result_of(answer)
        except TimeoutError:
            self._replace(worker)
            result = ScoreResult(0.0, f"timeout: scoring took over {self.timeout_s:g} s (worker replaced)", "timeout",
                                 cause="timeout" if user_fn else "")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as err:
            self._replace(worker)
            code = worker.proc.returncode
            result = ScoreResult(0.0, f"scorer crashed ({type(err).__name__}, exit code {code})", "crash",
                                 cause="crash" if user_fn else "")
        except BaseException:  # cancelled mid-request: its answer would be read by the next request
            self._replace(worker)
            raise
        else:
            self._idle.put_nowait(worker)
        self.counters[result.status] += 1
        if result.cause:
            self.reasons[f"reward_{result.cause}"] += 1
            self._log_first(user_fn, result, answer.get("traceback"))
        self.score_seconds += time.perf_counter() - start
        return result

    def _log_first(self, fn: str, result: ScoreResult, tb: Any) -> None:
        """Log the first failure of ``fn`` for each cause (with its traceback when it raised); later ones are only
        counted."""
        if (fn, result.cause) in self._logged:
            return
        self._logged.add((fn, result.cause))
        detail = f"\n{tb.rstrip()}" if isinstance(tb, str) and tb else ""
        log.warning("reward function %s scored 0: %s (logged once: later ones are counted as reward_%s)%s",
                    fn, result.reason, result.cause, detail)

    async def close(self) -> None:
        """Kill every worker (each was started by this pool) and stop replacing them."""
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        for worker in list(self._all):
            await self._discard(worker)


def _user_function(task: dict[str, Any], reward_function: str) -> str:
    """The spec of the user function that scores ``task``; empty for the built-in verifier."""
    checker = task.get("checker")
    spec = checker.get("reward_fn") if isinstance(checker, dict) else None
    return spec if isinstance(spec, str) and spec else reward_function


def _result_of(answer: dict[str, Any]) -> ScoreResult:
    reward, reason, status = answer.get("reward"), answer.get("reason"), answer.get("status")
    if status not in ("ok", "error") or type(reward) not in (int, float) or not isinstance(reason, str):
        return ScoreResult(0.0, f"malformed answer from a scoring worker: {str(answer)[:200]}", "error")
    extras = answer.get("extras")
    cause = answer.get("cause", "")
    return ScoreResult(float(reward), reason, status,
                       rewards.extras_of(extras) if isinstance(extras, dict) else MappingProxyType({}),
                       cause if cause in rewards.CAUSES else "")


# ------------------------------------------------------------------------------------------ the worker


def _load_function(spec: str, timeout_s: float) -> Callable[[str, dict[str, Any]], Any]:
    """``module:function`` (called as ``fn(text, task_dict)``), or the built-in scorer for an empty spec."""
    if not spec:
        from prorl_async.envs.score import score

        return lambda text, task: score(text, task, time_limit_s=timeout_s)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"generator.reward_function must be 'module:function' (got {spec!r})")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise UserError(f"generator.reward_function {spec!r}: {name} is not a callable in {module}")
    return fn


class _Scorers:
    """A worker's scoring functions: the default one (``reward_function`` or the built-in verifier) and each task
    spec's ``reward_fn``, imported once (module docstring)."""

    def __init__(self, reward_function: str, timeout_s: float) -> None:
        self.default_spec = reward_function
        self.default = _load_function(reward_function, timeout_s)
        self.by_spec: dict[str, rewards.RewardFunction | str] = {}  # a str: why it did not import
        self.reported: set[tuple[str, str]] = set()  # (function, cause) whose traceback went to the pool

    def preload(self, spec: str) -> None:
        """Import ``spec`` now; UserError (one line) if it does not import."""
        fn = self._get(spec)
        if isinstance(fn, str):
            raise UserError(fn)

    def _get(self, spec: str) -> rewards.RewardFunction | str:
        if spec not in self.by_spec:
            try:
                self.by_spec[spec] = rewards.RewardFunction(spec)
            except UserError as err:
                self.by_spec[spec] = " ".join(str(err).split())
            except (Exception, SystemExit) as err:
                target = spec.rpartition(":")[0]
                self.by_spec[spec] = f"reward function {spec!r}: importing {target} failed: {rewards.one_line(err)}"
        return self.by_spec[spec]

    def answer(self, request: Any) -> dict[str, Any]:
        task = request.get("task") if isinstance(request, dict) else None
        spec = _user_function(task, "") if isinstance(task, dict) else ""
        if not spec:
            return _score_one(self.default, request, self.default_spec, self.reported)
        fn = self._get(spec)
        if isinstance(fn, str):
            return _failure("unloadable", fn, spec, self.reported)
        return _score_one(lambda text, task: fn(text, rewards.row_of(task)), request, spec, self.reported)


def _score_one(fn: Callable[[str, dict[str, Any]], Any], request: Any, label: str = "",
               reported: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The answer to one request; ``label``: the user function's spec (empty: the built-in verifier)."""
    if not isinstance(request, dict) or not isinstance(request.get("text"), str):
        return {"reward": 0.0, "reason": "bad scoring request", "status": "error"}
    try:
        out = rewards.resolve_awaitable(fn(request["text"], request.get("task") or {}))
    except (Exception, SystemExit) as err:  # sys.exit() in a reward function is its error, not the worker's end
        return _failure("raised", f"reward raised {rewards.one_line(err)}", label, reported, traceback.format_exc())
    outcome = rewards.interpret(out)
    if outcome.cause:
        return _failure(outcome.cause, f"reward function {outcome.reason}", label, reported)
    answer: dict[str, Any] = {"reward": outcome.reward, "reason": outcome.reason, "status": "ok"}
    if outcome.extras:
        answer["extras"] = outcome.extras
    return answer


def _failure(cause: str, reason: str, label: str, reported: set[tuple[str, str]] | None,
             tb: str | None = None) -> dict[str, Any]:
    """A zero score with its cause (for a user function) and, the first time per function and cause, the traceback."""
    answer: dict[str, Any] = {"reward": 0.0, "reason": reason, "status": "error"}
    if label:
        answer["cause"] = cause
        if tb and reported is not None and (label, cause) not in reported:
            reported.add((label, cause))
            answer["traceback"] = tb[-8000:]
    return answer


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One scoring worker: reads the warm-up tasks (first frame), says it is ready, then answers length-prefixed
    JSON requests on stdin until EOF."""
    parser = argparse.ArgumentParser(description="prorl-async scoring worker (started by ScoringPool)")
    parser.add_argument("--timeout-s", type=float, required=True)
    parser.add_argument("--reward-function", default="")
    args = parser.parse_args(argv)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints of reward code must not corrupt answers
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer

    def answer(payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        answers.write(_HEADER.pack(len(data)) + data)

    try:
        scorers = _Scorers(args.reward_function, args.timeout_s)
        (size,) = _HEADER.unpack(requests.read(_HEADER.size))
        warm = json.loads(requests.read(size))
        for task in warm:
            if spec := _user_function(task, ""):
                scorers.preload(spec)
                continue
            # the verifiers' first use (lazy imports) must not count against a sample's timeout
            from prorl_async.envs.score import score

            answer_text = task.get("answer") or "0"
            score(f"<answer>{answer_text}</answer> \\boxed{{{answer_text}}}", task, time_limit_s=None)
    except UserError as err:
        answer({"ready": False, "error": str(err)})
        return 2
    except Exception as err:
        answer({"ready": False, "error": f"{type(err).__name__}: {err}"})
        return 2
    answer({"ready": True})
    while len(head := requests.read(_HEADER.size)) == _HEADER.size:
        (size,) = _HEADER.unpack(head)
        try:
            request = json.loads(requests.read(size))
        except ValueError:
            request = None
        answer(scorers.answer(request))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
