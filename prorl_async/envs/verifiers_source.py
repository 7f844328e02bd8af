"""A `verifiers <https://github.com/PrimeIntellect-ai/verifiers>`_ taskset as a data source (``pip install
prorl-async[verifiers]``): its tasks become rows, its rewards our reward.

    [[tasks.mix]]
    name = "sums"                  # the label in logs and metrics (default: the taskset's id)
    [tasks.mix.source]
    format = "verifiers"
    path = "my-taskset"            # an installed taskset package (verifiers' plugin id, as `vf-eval` takes it)
    options = {count = 500}        # the taskset's config fields (`--env.taskset.*`)

- **Rows.** The taskset's ``load()`` is iterated in a child process (its code never runs in the trainer's), once per
  process that opens the source (the supervisor's check, the learner, each generator; at most ``source.max_rows``
  tasks, which an infinite taskset must set), into an in-memory table: the
  task's prompt as chat messages (its ``system_prompt`` first), and ``vf_taskset``, ``vf_options``, ``vf_index``
  (its position in ``load()``), ``vf_key`` (verifiers' stable task identity). Held-out rows come from
  ``tasks.validation_size`` of them (or from ``validation_path``, another taskset id) like any data source's.
- **Reward.** :func:`reward` is the spec's reward function (set by default): in the scoring pool's worker it loads
  the same taskset once, builds a verifiers ``Trace`` of the prompt and the sampled reply, and runs the task's own
  scoring (its ``@vf.reward`` functions and config-plugged ones, weighted): the trace's reward is trained on, each
  named reward and metric becomes an extra (``reward_extras/<name>``). It runs where user reward code runs (a
  worker process with a time limit), so a taskset that raises or hangs costs that sample's reward, not the run.
- **Single-turn only.** A task that needs a container, tools (MCP toolsets), a runtime for its rewards or an LLM
  judge is refused when the source is opened (one line): this trainer samples one reply per prompt with no
  environment in the loop.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from prorl_async.errors import UserError

REWARD = "prorl_async.envs.verifiers_source:reward"
"""The reward function a ``format = "verifiers"`` source's spec gets unless it names one."""
LOAD_TIMEOUT_S = 300.0
"""How long loading a taskset's tasks (in a child process) may take."""
_INSTALL = "format = \"verifiers\" needs the verifiers package: pip install 'prorl-async[verifiers]'"


def load_rows(taskset_id: str, options: dict[str, Any], max_rows: int = 0) -> Any:
    """The taskset's tasks as a ``datasets.Dataset`` of rows (module docstring), made in a child process under
    :data:`LOAD_TIMEOUT_S` (the taskset's code never runs in the trainer's processes); UserError (one line) when the
    taskset cannot be loaded, is infinite without ``max_rows``, is not single-turn, or its loading fails or hangs."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="prorl-verifiers-") as tmp:
        out = Path(tmp) / "rows.jsonl"
        cmd = [sys.executable, "-m", "prorl_async.envs.verifiers_source", taskset_id, json.dumps(options),
               str(max_rows), str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"verifiers taskset {taskset_id!r}: loading its tasks took over {LOAD_TIMEOUT_S:g} s "
                            "(set source.max_rows to draw fewer)") from None
        if done.returncode != 0:
            lines = done.stdout.strip().splitlines()
            error = json.loads(lines[-1]).get("error") if lines and lines[-1].startswith("{") else None
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise UserError(error or f"verifiers taskset {taskset_id!r}: loading it exited with {done.returncode}: "
                            f"{last}")
        with out.open() as f:
            rows = [json.loads(line) for line in f]
    return datasets.Dataset.from_list(rows)


def task_rows(taskset_id: str, options: dict[str, Any], max_rows: int = 0) -> list[dict[str, Any]]:
    """The rows of :func:`load_rows`, made in this process (the child's work)."""
    taskset = _taskset(taskset_id, json.dumps(options, sort_keys=True))
    if not taskset.bounded and not max_rows:
        raise UserError(f"verifiers taskset {taskset_id!r} is infinite: set source.max_rows (tasks to draw from it)")
    rows = []
    for index, task in enumerate(taskset):
        if max_rows and index >= max_rows:
            break
        if index == 0:
            _check_single_turn(taskset_id, task)
        rows.append({"prompt": _messages(taskset_id, task), "vf_taskset": taskset_id,
                     "vf_options": json.dumps(options, sort_keys=True), "vf_index": index, "vf_key": task.key})
    if not rows:
        raise UserError(f"verifiers taskset {taskset_id!r} yields no tasks (options: {options})")
    return rows


async def reward(completion: str, vf_taskset: str, vf_options: str, vf_index: int) -> dict[str, Any]:
    """The task's own scoring of ``completion`` as the reply to its prompt: ``{"reward": weighted sum, **named}``."""
    import verifiers.v1 as vf
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.state import state_cls
    from verifiers.v1.trace import Trace, TraceTask
    from verifiers.v1.types import AssistantMessage, SystemMessage, UserMessage

    task = _tasks(vf_taskset, vf_options)[vf_index]
    trace = Trace(task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                  state=state_cls(type(task))(), agent=vf.AgentInfo(config=vf.AgentConfig(), name="prorl-async"))
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    for position, message in enumerate(_messages(vf_taskset, task)):
        node = MessageNode(parent=position - 1 if position else None,
                           message=kinds[message["role"]](content=message["content"]))
        trace.nodes.append(node)
    trace.nodes.append(MessageNode(parent=len(trace.nodes) - 1, message=AssistantMessage(content=completion),
                                   sampled=True))
    trace.is_completed = trace.ok = True
    await task.score(trace)
    named = {name: r.score for name, r in trace.rewards.items() if r is not None}
    named |= {name: value for name, value in trace.metrics.items() if value is not None and name not in named}
    return {**named, "reward": trace.reward}


@functools.cache
def _taskset(taskset_id: str, options: str) -> Any:
    try:
        from verifiers.v1.utils.loaders import load_taskset, taskset_config_type
    except ImportError:
        raise UserError(_INSTALL) from None
    try:
        config = taskset_config_type(taskset_id).model_validate({**json.loads(options), "id": taskset_id})
        return load_taskset(config)
    except (ModuleNotFoundError, TypeError, AttributeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"verifiers taskset {taskset_id!r}: {first}") from None


class _Tasks:
    """A taskset's tasks in ``load()`` order, drawn as far as asked (an infinite one too)."""

    def __init__(self, taskset: Any) -> None:
        self._iterator, self._tasks = iter(taskset), []

    def __getitem__(self, index: int) -> Any:
        while len(self._tasks) <= index:
            self._tasks.append(next(self._iterator))
        return self._tasks[index]


@functools.cache
def _tasks(taskset_id: str, options: str) -> _Tasks:
    """The tasks of a taskset (a scoring worker's, loaded once)."""
    return _Tasks(_taskset(taskset_id, options))


def _messages(taskset_id: str, task: Any) -> list[dict[str, str]]:
    """The task's prompt as chat messages, text only: its system prompt, then its prompt (a string or messages)."""
    data = task.data
    out = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    if isinstance(data.prompt, str):
        return [*out, {"role": "user", "content": data.prompt}]
    for message in data.prompt or []:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise UserError(f"verifiers taskset {taskset_id!r}: task {data.idx} has a {role} message that is not "
                            "plain text; prorl-async trains on text prompts")
        out.append({"role": role, "content": content})
    if not out:
        raise UserError(f"verifiers taskset {taskset_id!r}: task {data.idx} has no prompt")
    return out


def _check_single_turn(taskset_id: str, task: Any) -> None:
    import inspect

    kind = type(task)
    why = ""
    if kind.NEEDS_CONTAINER:
        why = "needs a container"
    elif kind.toolsets(task.config):
        why = "has tools (MCP toolsets)"
    elif task.config.judges:
        why = "is scored by an LLM judge"
    else:
        for fn in (*task.hooks("reward"), *task.hooks("metric")):
            param = inspect.signature(fn).parameters.get("runtime")
            if param is not None and param.default is inspect.Parameter.empty:
                why = f"scores with a runtime ({fn.__name__})"
                break
    if why:
        raise UserError(f"verifiers taskset {taskset_id!r}: its task {kind.__name__} {why}; prorl-async trains "
                        "single-turn tasks scored from the reply alone")


def main(argv: list[str] | None = None) -> int:
    """``python -m prorl_async.envs.verifiers_source TASKSET OPTIONS_JSON MAX_ROWS OUT``: write the rows as JSON
    lines to OUT; on a UserError, print ``{"error": ...}`` and exit with 2."""
    taskset_id, options, max_rows, out = sys.argv[1:] if argv is None else argv
    try:
        rows = task_rows(taskset_id, json.loads(options), int(max_rows))
    except UserError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
