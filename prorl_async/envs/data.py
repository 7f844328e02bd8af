"""Data sources: reading the user's own data set for a task spec (``[tasks.mix.source]``).

A spec with ``source = {path = ...}`` (:class:`~prorl_async.config.DataSourceConfig`) trains on a local JSONL/JSON,
parquet or CSV file, or a directory (a Hugging Face data set saved with ``save_to_disk``, or a local data set
repository of data files), next to the built-in tasks; :mod:`prorl_async.envs.data_split` makes its rows problems.
Nothing is downloaded: a path that does not exist is a UserError before ``datasets`` sees it.

**Reading** (why ``datasets``): every format becomes Arrow files that are memory-mapped, so a data set of millions
of rows costs disk and page cache, not process memory.

- A file is read with ``load_dataset(json|parquet|csv, data_files=path)``, converted once into the ``datasets``
  cache (``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``), keyed by the file's path and
  modification time (an edited file is converted again). The learner and every generator build the mix: the first
  converts, the others wait on the cache's file lock and map the result, as later runs do. A ``save_to_disk``
  directory is mapped where it lies; another directory is read as a data set repository, its ``split``.
- Opening reads the schema and the row count only. Columns are read as Arrow arrays, chunk by chunk
  (:meth:`DataSource.chunks`); a row becomes Python data only when asked for (:meth:`DataSource.row`, by index).
- Measured (``bench/data_load.py``, 1M rows in verl's schema, 200-character prompts, 2-core EPYC): the first
  process converts the 65 MiB parquet into a 261 MiB cache in 1.2 s; a later one opens it in 0.04 s, scans it
  (:mod:`~prorl_async.envs.data_split`) in 0.55 s and holds 15 MiB of its own memory for it (the scanned prompt
  column's ~260 MiB of mapped pages are the page cache's, shared by every process); one row to a task: ~80 us.

**Columns**: ``source.prompt`` holds a string (one user message) or a chat list of ``{role, content}`` messages,
``source.answer`` the reference answer; ``auto`` takes the first present of :data:`PROMPT_COLUMNS` /
:data:`ANSWER_COLUMNS`, so verl's schema (``prompt`` a chat list, ``reward_model.ground_truth``) needs nothing but
``path``. A dotted name reaches into a struct column. A missing column is a one-line UserError naming the file, the
column and the columns there are.

**What a domain's verifier needs** (:func:`check`; with the spec's ``reward`` set, none of it applies):

===============  ===================================================================================
domain           a row needs
===============  ===================================================================================
``math``         an answer (compared by value, :mod:`prorl_async.envs.domains.math`)
``stem``         an answer: a letter (``B``, ``(b)``) or a 0-based choice index; ``choices`` (at most 4,
                 a list or ``{text: [...]}``) if the prompt does not list them
``code``         a string ``prompt`` (the stub), ``test`` (defines ``check(candidate)``), ``entry_point``;
                 or, without ``entry_point``, input/output tests as the answer (verl's competitive
                 programming rows: ``{inputs, outputs[, fn_name]}``, :mod:`.domains.code_io`)
``instruction``  ``instruction_id_list`` and ``kwargs`` (IFEval's schema)
``logic``        cannot: reasoning-gym's verifier needs its generator's metadata; set ``reward``
===============  ===================================================================================

Usage::

    source = check(spec)                  # UserError (one line): no file, no column, unreadable, domain needs
    source.columns, source.num_rows       # top-level columns, rows
    source.prompt, source.answer          # the resolved column names (answer: None when there is none)
    source.row(17)                        # row 17's columns as JSON-able data
    held = open_source(spec, validation=True)  # where held-out rows come from (see separate_validation)
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prorl_async.errors import UserError

if TYPE_CHECKING:
    from prorl_async.config import TaskSpec

PROMPT_COLUMNS = ("prompt", "messages", "question", "problem", "instruction")
"""``source.prompt = "auto"``: the first of these columns the data has."""
ANSWER_COLUMNS = ("reward_model.ground_truth", "answer", "solution", "label", "ground_truth")
"""``source.answer = "auto"``: the first of these columns the data has (none: no reference answer)."""
SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv"}
_NEEDS = {"math": ("answer",), "stem": ("answer",), "code": ("test", "entry_point"),
          "instruction": ("instruction_id_list",), "logic": ()}  # columns a domain's verifier reads, per row


# ------------------------------------------------------------------------------------------- reading


class DataSource:
    """One split of a data set, memory-mapped: columns, row count, the resolved prompt and answer columns; rows are
    turned into Python data only on demand."""

    def __init__(self, path: Path, fmt: str, split: str, dataset: Any, prompt: str, answer: str) -> None:
        if dataset._indices is not None:  # a selection over a table: make it a table of its own (rare)
            dataset = dataset.flatten_indices()
        self.path, self.format, self.split, self.dataset = path, fmt, split, dataset
        self._table: pa.Table = dataset.data.table
        self.columns: list[str] = list(self._table.column_names)
        self.num_rows: int = self._table.num_rows
        self.types = _fields(self._table.schema)  # every column, nested struct fields as dotted names
        self.prompt = self._resolve(prompt, PROMPT_COLUMNS, "prompt")
        self.answer = None if answer == "" else self._resolve(answer, ANSWER_COLUMNS, "answer", required=False)
        kind = _prompt_kind(self.types[self.prompt])
        if kind is None:
            raise UserError(f"{path}: column {self.prompt!r} holds {self.types[self.prompt]}; a prompt is a string or "
                            "a chat list of {role, content} messages (set source.prompt)")
        self.chat = kind == "chat"

    def __repr__(self) -> str:
        return f"DataSource({str(self.path)!r}, rows={self.num_rows}, prompt={self.prompt!r}, answer={self.answer!r})"

    def describe_columns(self, limit: int = 40) -> str:
        """The columns as the user may name them (struct fields dotted), for error messages."""
        leaves = [n for n, t in self.types.items() if not pa.types.is_struct(t)]
        return ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")

    def _resolve(self, asked: str, auto: Sequence[str], field: str, required: bool = True) -> str | None:
        if asked != "auto":
            if asked not in self.types:
                raise UserError(f"{self.path}: no column {asked!r} (columns: {self.describe_columns()}); set "
                                f"source.{field} to one of them")
            return asked
        found = next((name for name in auto if name in self.types), None)
        if found is None and required:
            raise UserError(f"{self.path}: no {field} column (looked for {', '.join(auto)}; columns: "
                            f"{self.describe_columns()}); set source.{field}")
        return found

    def row(self, index: int) -> dict[str, Any]:
        """Row ``index``'s columns as JSON-able data: the only place a row becomes Python objects."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"{self.path} has {self.num_rows} rows (asked for row {index})")
        record = self._table.slice(index, 1).to_pylist()[0]
        return {str(k): plain(v) for k, v in record.items()}

    def chunks(self, name: str) -> Iterator[pa.Array]:
        """Column ``name`` (dotted: a struct field) as Arrow arrays, chunk by chunk, mapped, not copied."""
        top, *fields = _parts(name, self.columns)
        for chunk in self._table.column(top).chunks:
            for field in fields:
                chunk = pc.struct_field(chunk, field)
            yield chunk

    def values(self, name: str, indices: Sequence[int]) -> list[Any]:
        """The Python values of column ``name`` at rows ``indices``, taken chunk by chunk: Arrow's ``take`` on a
        whole chunked column first concatenates it (a copy of the column: 200 MB for 1M prompts)."""
        top, *fields = _parts(name, self.columns)
        column = self._table.column(top)
        starts = np.cumsum([0, *(len(c) for c in column.chunks)])
        rows = np.asarray(indices, np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        out: list[Any] = [None] * len(rows)
        for chunk in np.unique(which).tolist():
            at = np.flatnonzero(which == chunk)
            taken = column.chunk(chunk).take(pa.array(rows[at] - starts[chunk]))
            for field in fields:
                taken = pc.struct_field(taken, field)
            for position, value in zip(at.tolist(), taken.to_pylist(), strict=True):
                out[position] = value
        return out


def open_source(spec: TaskSpec, *, validation: bool = False) -> DataSource:
    """The rows of ``spec.source.path`` (its ``split``), or with ``validation`` those held-out rows are drawn from:
    ``validation_path`` (its ``validation_split``, else ``split``), else the ``validation_split`` of ``path``, else
    ``path`` itself (see :func:`separate_validation`). Columns are resolved; UserError for a missing file or column
    or a file that cannot be read."""
    source = spec.source
    if source is None:
        raise ValueError(f"task spec {spec.domain}/{spec.name} has no data source")
    path = source.validation_path if validation and source.validation_path else source.path
    split = (source.validation_split or source.split) if validation else source.split
    if source.format == "verifiers":  # a taskset's id, not a path: its tasks, as rows
        from prorl_async.envs.verifiers_source import load_rows

        return DataSource(Path(path), "verifiers", split, load_rows(path, source.options, source.max_rows), "prompt",
                          "")
    return _open(Path(path), source.format, split, source.prompt, source.answer)


def separate_validation(spec: TaskSpec) -> bool:
    """Whether held-out rows come from other rows than training's (``validation_path``, or another split of a
    directory), rather than from the training rows themselves."""
    source = spec.source
    assert source is not None
    if source.validation_path:
        return True
    if source.format == "verifiers":
        return False
    return bool(source.validation_split) and source.validation_split != source.split and Path(source.path).is_dir()


def check(spec: TaskSpec) -> DataSource:
    """Open ``spec``'s data (and its separate validation data) and check what its verifier needs, without building
    the mix or reading a row into Python (``stem`` and ``instruction`` scan a column as Arrow); UserError (one line)
    for anything missing. Returns the training source."""
    return open_checked(spec)[0]


def open_checked(spec: TaskSpec) -> tuple[DataSource, DataSource]:
    """The training source and the one held-out rows come from (the same object when they are the same rows)."""
    _check_params(spec)
    source = open_source(spec)
    held = open_source(spec, validation=True) if separate_validation(spec) else source
    for data in {id(source): source, id(held): held}.values():
        _check_domain(spec, data)
    return source, held


def _open(path: Path, fmt: str, split: str, prompt: str, answer: str) -> DataSource:
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (source paths are relative to the working directory, "
                        f"{Path.cwd()})")
    fmt = _format(path, fmt)
    return DataSource(path, fmt, split, _load(path, fmt, split), prompt, answer)


def _format(path: Path, fmt: str) -> str:
    if fmt == "auto":
        if path.is_dir():
            return "hf"
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{path}: cannot tell its format from the suffix {path.suffix or '(none)'!r} (known: "
                            f"{', '.join(SUFFIXES)}); set source.format to json, parquet or csv")
        return SUFFIXES[path.suffix.lower()]
    if fmt == "hf" and not path.is_dir():
        raise UserError(f"{path}: source.format = 'hf' reads a directory (a saved or repository data set); this is "
                        "a file: set source.format to json, parquet or csv, or auto")
    return fmt


def _load(path: Path, fmt: str, split: str) -> Any:
    import datasets

    try:
        with _quiet():
            if fmt != "hf":
                where = {"data_dir": str(path)} if path.is_dir() else {"data_files": str(path)}
                data = datasets.load_dataset(fmt, **where)
            elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                data = datasets.load_from_disk(str(path))  # mapped where it lies
            else:
                data = datasets.load_dataset(str(path))  # a local repository: its data files, by split
    except Exception as err:
        what = "a data set directory" if fmt == "hf" else f"{fmt}"
        raise UserError(f"{path}: cannot be read as {what}: {_cause(err)} (check the file, or set source.format)"
                        ) from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) == 1 and not path.is_dir():
            return next(iter(data.values()))  # a file has one split, whatever ``split`` says
        if split not in data:
            raise UserError(f"{path}: no split {split!r} (splits: {', '.join(data)}); set source.split")
        return data[split]
    return data


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or logs from ``datasets`` while it reads: they would run through the TUI, and its errors
    come back as the exception that :func:`_load` turns into one line."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _cause(err: BaseException) -> str:
    """The innermost cause's first line, short: ``datasets`` wraps the parser's error in a generic one."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:200]}"


def _parts(name: str, columns: Sequence[str]) -> list[str]:
    return [name] if name in columns else name.split(".")


def _fields(schema: pa.Schema) -> dict[str, pa.DataType]:
    out: dict[str, pa.DataType] = {}

    def walk(name: str, kind: pa.DataType) -> None:
        out[name] = kind
        if pa.types.is_struct(kind):
            for i in range(kind.num_fields):
                walk(f"{name}.{kind.field(i).name}", kind.field(i).type)

    for field in schema:
        walk(field.name, field.type)
    return out


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _prompt_kind(kind: pa.DataType) -> str | None:
    """``text``, ``chat`` (a list of structs with string ``role`` and ``content``), or None."""
    if is_text(kind):
        return "text"
    if is_list(kind) and pa.types.is_struct(kind.value_type):
        item = kind.value_type
        names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
        if is_text(names.get("role", pa.null())) and is_text(names.get("content", pa.null())):
            return "chat"
    return None


# ------------------------------------------------------------------------------------ domain checks


def _check_params(spec: TaskSpec) -> None:
    allowed = {"timeout_s", "memory_mb", "max_tests"} if spec.domain == "code" and not spec.reward else set()
    unknown = sorted(set(spec.params) - allowed)
    if unknown:
        takes = f"takes only {', '.join(sorted(allowed))}" if allowed else "takes none"
        raise UserError(f"params {unknown}: a data source's spec {takes} (remove them)")


def _check_domain(spec: TaskSpec, source: DataSource) -> None:
    """UserError unless ``source``'s columns carry what ``spec.domain``'s verifier reads (module docstring)."""
    if spec.reward:
        return
    path, domain = source.path, spec.domain
    if domain == "logic":
        raise UserError(f"{path}: the logic domain's verifier (reasoning-gym) needs its generator's metadata, which "
                        "data rows do not have; set the spec's reward, or another domain (math, stem, code, "
                        "instruction)")
    if domain in ("math", "stem") and source.answer is None:
        raise UserError(f"{path}: {domain} rows need a reference answer and there is no answer column (looked for "
                        f"{', '.join(ANSWER_COLUMNS)}; columns: {source.describe_columns()}); set source.answer, or "
                        "the spec's reward")
    if domain == "stem":
        _check_stem(source)
    elif domain == "code" and io_tests(source):
        from prorl_async.envs.domains.code_io import parse_tests

        first = next((i for i in range(min(source.num_rows, 64)) if lookup(source.row(i), source.answer)), None)
        try:
            parse_tests(lookup(source.row(first), source.answer) if first is not None else None)
        except (ValueError, TypeError) as err:
            raise UserError(f"{path}: code rows without HumanEval's entry_point need input/output tests in "
                            f"{source.answer!r} (JSON: inputs, outputs, optional fn_name): {err}") from None
    elif domain == "code":
        if source.chat:
            raise UserError(f"{path}: code rows need a string prompt (the function's stub, HumanEval's schema), "
                            f"{source.prompt!r} holds chat messages; set the spec's reward to score them your way")
        for name in ("test", "entry_point"):
            _require(source, name, "code", is_text)
    elif domain == "instruction":
        _require(source, "instruction_id_list", "instruction", lambda t: is_list(t) and is_text(t.value_type))
        _require(source, "kwargs", "instruction", lambda t: is_list(t) or is_text(t))
        from prorl_async.envs.domains.ifeval_checks import CHECKS

        ids = set()
        for chunk in source.chunks("instruction_id_list"):
            ids.update(pc.unique(pc.list_flatten(chunk)).to_pylist())
        unknown = sorted(i for i in ids - set(CHECKS) if i is not None)
        if unknown:
            raise UserError(f"{path}: instructions the offline IFEval checker does not know: {', '.join(unknown)}; "
                            "remove those rows, or set the spec's reward")


def _require(source: DataSource, name: str, domain: str, kind_ok: Any) -> None:
    kind = source.types.get(name)
    if kind is None:
        raise UserError(f"{source.path}: no column {name!r}, which {domain} rows need (columns: "
                        f"{source.describe_columns()}); add it, or set the spec's reward")
    if not kind_ok(kind):
        raise UserError(f"{source.path}: column {name!r} holds {kind}, not what {domain} rows need there (see "
                        "prorl_async.envs.data); fix the data, or set the spec's reward")


def _check_stem(source: DataSource) -> None:
    kind = source.types[source.answer]  # type: ignore[index]
    if not (is_text(kind) or pa.types.is_integer(kind)):
        raise UserError(f"{source.path}: stem answers in {source.answer!r} are {kind}; they must be a letter (A-D) "
                        "or a 0-based choice index")
    choices = _choices_column(source)
    if choices is None:
        return
    most = max((pc.max(pc.list_value_length(c)).as_py() or 0 for c in source.chunks(choices)), default=0)
    if most > 4:
        raise UserError(f"{source.path}: rows with up to {most} choices; the stem verifier reads the letters A-D "
                        "(at most 4 choices): set the spec's reward to score them")


def _choices_column(source: DataSource) -> str | None:
    """``choices`` (a list of strings) or ``choices.text`` (ARC's ``{text, label}``), if the rows have it."""
    for name in ("choices", "choices.text"):
        kind = source.types.get(name)
        if kind is not None and is_list(kind) and (is_text(kind.value_type) or pa.types.is_integer(kind.value_type)):
            return name
    return None


def needs(source: DataSource, spec: TaskSpec) -> list[str]:
    """The columns a row of ``source`` must have a value in for ``spec``'s verifier (the prompt aside)."""
    if spec.reward:
        return []
    wanted = ("answer",) if spec.domain == "code" and io_tests(source) else _NEEDS[spec.domain]
    names = [source.answer if name == "answer" else name for name in wanted]
    return [name for name in names if name]


def io_tests(source: DataSource) -> bool:
    """Whether ``source``'s code rows carry input/output tests in their answer (no HumanEval ``entry_point``)."""
    return "entry_point" not in source.types and source.answer is not None



# --------------------------------------------------------------------------------------------- rows


def lookup(row: dict[str, Any], name: str) -> Any:
    """Column ``name`` of a row (dotted: into nested structs); None where absent."""
    if name in row:
        return row[name]
    value: Any = row
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def answer_text(value: Any) -> str | None:
    """A reference answer as text: strings as they are, numbers in Python's form, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def plain(value: Any) -> Any:
    """``value`` as JSON-able data: bytes as UTF-8 text (else base64), dates in ISO form, numpy values as lists or
    numbers, Arrow maps (key/value pairs) as lists, anything else as its ``str``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return base64.b64encode(bytes(value)).decode()
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return str(value)
