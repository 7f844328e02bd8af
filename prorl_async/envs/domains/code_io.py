"""Code with input/output tests: the competitive-programming rows of verl, PRIME (Eurus-2-RL), TACO and APPS.

A row's reference answer (``reward_model.ground_truth`` in verl's schema) is the tests, a JSON string or a mapping::

    {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}                    standard input -> standard output
    {"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [[3], ...]}        call-based: arguments -> return value
    {"fn_name": "add", "inputs": ["1\\n2", ...], "outputs": ["3", ...]}       the same as PRIME writes it (JSON lines)

The response's program (its last fenced Python block, inside an answer tag if there is one) runs once per sample in
:mod:`prorl_async.envs.sandbox`, in a harness that runs it afresh for each test (at most ``max_tests``, the first
ones): its standard input the test's input, its standard output captured; call-based, the program is run once and
``fn_name`` (a function, or a method of a class ``Solution``) is called with each test's arguments. The harness
prints the outputs after a random nonce; they are compared here, outside the sandbox, so the program never sees
the expected outputs:

- standard output matches when its lines match with trailing blanks ignored, or else token by token, numbers
  within 1e-6 (relative or absolute);
- a return value matches the expected one, or the expected one's only element (APPS wraps them in a list); tuples
  compare as lists.

Reward 1 when every test run passes; with ``partial_credit`` the share that passed (ProRL's continuous code
reward). ``params``: ``timeout_s`` (wall
clock per test, default 5; the whole run gets ``timeout_s x tests``, at most 120 s), ``memory_mb`` (512),
``max_tests`` (16).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from typing import Any

from prorl_async.envs.domains.extract import code_block
from prorl_async.envs.sandbox import SandboxLimits, run_python

PARAMS = {"timeout_s": 5.0, "memory_mb": 512, "max_tests": 16}
_TOTAL_TIMEOUT_S = 120.0
_TOLERANCE = 1e-6

_HARNESS = '''\
import io as __prorl_io
import json as __prorl_json
import os as __prorl_os
import sys as __prorl_sys
__prorl_source = {source!r}
__prorl_code = compile(__prorl_source, "solution.py", "exec")
__prorl_inputs = {inputs!r}
__prorl_fn = {fn_name!r}
__prorl_out = []
__prorl_real_stdout = __prorl_sys.stdout


def __prorl_plain(value):
    if isinstance(value, tuple | list):
        return [__prorl_plain(v) for v in value]
    if isinstance(value, dict):
        return {{str(k): __prorl_plain(v) for k, v in value.items()}}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


if __prorl_fn:
    __prorl_globals = {{"__name__": "__main__", "exit": __prorl_sys.exit, "quit": __prorl_sys.exit}}
    exec(__prorl_code, __prorl_globals)
    __prorl_target = __prorl_globals.get(__prorl_fn)
    if __prorl_target is None and "Solution" in __prorl_globals:
        __prorl_target = getattr(__prorl_globals["Solution"](), __prorl_fn, None)
    for __prorl_args in __prorl_inputs:
        try:
            __prorl_result = __prorl_target(*__prorl_args)
            __prorl_out.append({{"ok": True, "value": __prorl_plain(__prorl_result)}})
        except BaseException as __prorl_err:  # noqa
            __prorl_out.append({{"ok": False, "error": type(__prorl_err).__name__}})
else:
    for __prorl_text in __prorl_inputs:
        __prorl_sys.stdin = __prorl_io.TextIOWrapper(__prorl_io.BytesIO(__prorl_text.encode()))
        __prorl_capture = __prorl_io.StringIO()
        __prorl_sys.stdout = __prorl_capture
        try:
            exec(__prorl_code, {{"__name__": "__main__", "exit": __prorl_sys.exit, "quit": __prorl_sys.exit}})
            __prorl_ok, __prorl_error = True, ""
        except SystemExit as __prorl_exit:
            __prorl_ok = __prorl_exit.code in (None, 0)
            __prorl_error = "" if __prorl_ok else "SystemExit"
        except BaseException as __prorl_err:  # noqa
            __prorl_ok, __prorl_error = False, type(__prorl_err).__name__
        finally:
            __prorl_sys.stdout = __prorl_real_stdout
        __prorl_out.append({{"ok": __prorl_ok, "value": __prorl_capture.getvalue(), "error": __prorl_error}})
__prorl_sys.stdout.flush()
__prorl_os.write(1, ("\\n{nonce}" + __prorl_json.dumps(__prorl_out) + "\\n").encode())
'''


def parse_tests(value: Any) -> dict[str, Any]:
    """The tests of a row's answer (a JSON string or a mapping); ValueError when they are not input/output tests."""
    tests = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(tests, Mapping):
        raise ValueError(f"the tests are a {type(tests).__name__}, not a mapping with inputs and outputs")
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise ValueError("the tests need 'inputs' and 'outputs', two lists of one non-zero length")
    fn_name = tests.get("fn_name") or ""
    if not fn_name and not all(isinstance(i, str) for i in inputs):
        raise ValueError("standard-input tests need string inputs (or a 'fn_name' for call-based tests)")
    if fn_name:  # PRIME writes a call's arguments as JSON lines and its value as JSON text; APPS as JSON values
        inputs = [[json.loads(line) for line in i.splitlines() if line.strip()] if isinstance(i, str) else i
                  for i in inputs]
        inputs = [i if isinstance(i, list) else [i] for i in inputs]
        outputs = [_json_or_text(o) for o in outputs]
    return {"inputs": inputs, "outputs": outputs, "fn_name": str(fn_name)}


def _json_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def score(text: str, tests_value: Any, limits: Mapping[str, Any], partial_credit: bool = False) -> tuple[float, str]:
    """Reward and reason for the program in ``text`` on the row's tests (module docstring)."""
    try:
        tests = parse_tests(tests_value)
    except (ValueError, TypeError) as err:
        return 0.0, f"unusable tests: {str(err)[:160]}"
    code = code_block(text, tests["fn_name"] or None)
    if code is None:
        return 0.0, "no code found"
    try:
        compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return 0.0, f"syntax error: {type(err).__name__}: {str(err)[:120]}"
    count = min(len(tests["inputs"]), int(limits.get("max_tests", PARAMS["max_tests"])))
    inputs, outputs = tests["inputs"][:count], tests["outputs"][:count]
    nonce = secrets.token_hex(12)
    program = _HARNESS.format(source=code, inputs=inputs, fn_name=tests["fn_name"], nonce=nonce)
    per_test = float(limits.get("timeout_s", PARAMS["timeout_s"]))
    timeout_s = min(per_test * count, _TOTAL_TIMEOUT_S)
    result = run_python(program, SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)),
                                               memory_mb=int(limits.get("memory_mb", PARAMS["memory_mb"]))))
    at = result.stdout.rfind(nonce)
    if at < 0:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
        if last:
            return 0.0, f"{result.status}: {last[:160]}"
        return 0.0, f"the program ended before the tests ({result.status})"
    try:
        runs = json.loads(result.stdout[at + len(nonce):].splitlines()[0])
    except (ValueError, IndexError):
        return 0.0, "the harness's report was cut short (output limit)"
    passed = sum(run.get("ok") and _matches(run.get("value"), want, bool(tests["fn_name"]))
                 for run, want in zip(runs, outputs, strict=False))
    reason = f"{passed}/{count} tests passed"
    if passed == count:
        return 1.0, reason
    return (passed / count if partial_credit else 0.0), reason


def _matches(got: Any, want: Any, call: bool) -> bool:
    if call:
        return got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])
    if not isinstance(got, str):
        return False
    want = want if isinstance(want, str) else "\n".join(map(str, want)) if isinstance(want, list) else str(want)
    if _lines(got) == _lines(want):
        return True
    a, b = got.split(), want.split()
    return len(a) == len(b) and all(x == y or _close(x, y) for x, y in zip(a, b, strict=True))


def _close(x: str, y: str) -> bool:
    try:
        u, v = float(x), float(y)
    except ValueError:
        return False
    return math.isclose(u, v, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]
