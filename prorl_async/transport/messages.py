"""Wire messages between processes: dataclasses, ``encode`` and a validating ``decode``.

Wire format (schema version ``SCHEMA_VERSION``), no pickle anywhere:

- frame 0: one byte, the message type — a SUB socket can filter on it. Learner -> generators (control):
  ``b"W"`` weights ready, ``b"Q"`` group request, ``b"V"`` validate, ``b"S"`` stop. Generators -> learner
  (groups socket, in this order per generator): ``b"R"`` ready, ``b"G"`` group, ``b"X"`` request returned,
  ``b"A"`` validation answer, ``b"H"`` heartbeat, ``b"M"`` status;
- frame 1: a msgpack map with ``"v": SCHEMA_VERSION`` and exactly the fields of that type;
- an array is ``[dtype, length, bytes]``: little-endian raw bytes (``"<i4"`` token ids and policy
  versions, ``"<f4"`` log-probs, ``"<f8"`` rewards), the dtype fixed per field.

A group travels as flat arrays: the samples' tokens concatenated, with a ``lengths`` array, so that
validation is a handful of vectorised numpy reductions whatever the group size — no per-token Python.

``decode`` trusts nothing: any deviation raises one :class:`MessageError` whose ``reason`` is one of
:data:`REASONS` (receivers count by reason and go on). It checks the frame count and type byte, the
schema version, the exact key set and the type of every field, array dtypes and byte lengths, sizes
under :class:`Limits`, a non-empty prompt and responses of at least one token (a group must be
trainable: one the learner cannot train on would stop it), token ids in ``[0, vocab_size)``, log-probs
finite and ``<= 0``, rewards and every float finite, per-sample policy versions ``>= 0`` and
non-decreasing, and the group's ``min_version``/``max_version`` equal to the extremes of its tokens' versions.

Usage::

    frames = encode(group)                       # list[bytes]: send with send_multipart
    msg = decode(frames, Limits(vocab_size=49152))  # raises MessageError(reason=...) on bad input
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

if TYPE_CHECKING:
    from prorl_async.config import Config

SCHEMA_VERSION = 1

REASONS = (
    "frames",  # not two frames, or frame 0 is not one byte
    "type",  # unknown message type byte
    "msgpack",  # frame 1 is not a msgpack map
    "schema",  # missing or different schema version
    "field",  # a key missing or unexpected, or a field of the wrong type
    "array",  # an array with the wrong dtype, or a byte length that contradicts its declared length
    "size",  # over a configured limit (bytes, samples, tokens, string length, metrics)
    "token",  # a token id outside [0, vocab_size)
    "logprob",  # a log-prob that is not finite or is > 0
    "nonfinite",  # a reward or another float that is NaN or infinite
    "version",  # policy versions negative, decreasing within a sample, or contradicting min/max_version
    "value",  # another invalid value (negative id or sequence number, lengths that do not add up)
)


class MessageError(ValueError):
    """A message that failed validation; ``reason`` (one of :data:`REASONS`) is what receivers count by."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces; the defaults are generous, :meth:`from_config` tightens them for a run."""

    max_message_bytes: int = 256 << 20
    """Largest frame 1 (ZeroMQ's ``MAXMSGSIZE`` stops bigger frames before they are read)."""
    max_samples: int = 4096
    """Samples per group."""
    max_response_tokens: int = 1 << 20
    """Tokens of one sample's response."""
    max_prompt_tokens: int = 1 << 20
    """Tokens of a group's prompt."""
    vocab_size: int | None = None
    """Token ids must be below this when known."""
    max_string_chars: int = 1 << 16
    """Characters of any string field (ids, names, reasons)."""
    max_metrics: int = 4096
    """Entries of one metrics message."""

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int | None = None) -> Limits:
        """The limits a run implies: its group size, response and context lengths, and message size."""
        return cls(
            max_message_bytes=int(cfg.transport.max_message_mb * (1 << 20)),
            max_samples=cfg.sampling.group_size,
            max_response_tokens=cfg.sampling.max_response_tokens,
            max_prompt_tokens=cfg.model.max_model_len,
            vocab_size=vocab_size,
        )


DEFAULT_LIMITS = Limits()

# ------------------------------------------------------------------------------------------ messages


@dataclass(eq=False)
class Sample:
    """One completion: response tokens with their behaviour log-probs and the policy version of each token."""

    token_ids: np.ndarray
    """(T,) int32 response token ids."""
    logprobs: np.ndarray
    """(T,) float32 log-probs of the sampled tokens under the policy that sampled them (vLLM's)."""
    versions: np.ndarray
    """(T,) int32 policy version of each token; non-decreasing (weights may change mid-sample)."""
    finish_reason: str
    """Why generation ended (``stop``, ``length``, ``abort``)."""
    reward: float
    """Verifiable reward, finite (in [0, 1] for the built-in scorers)."""
    reward_reason: str = ""
    """Why the scorer gave that reward (``correct``, ``wrong_answer``, ``timeout``, ...)."""

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        self.versions = np.asarray(self.versions, dtype=np.int32)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (
            np.array_equal(self.token_ids, other.token_ids)
            and np.array_equal(self.logprobs, other.logprobs)
            and np.array_equal(self.versions, other.versions)
            and (self.finish_reason, self.reward, self.reward_reason)
            == (other.finish_reason, other.reward, other.reward_reason)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=False)
class TrajectoryGroup:
    """All n samples of one prompt: the unit of transport, variance filtering and group advantages.

    ``min_version``/``max_version`` span the policy versions of all its tokens (``None`` derives them
    from the samples); ``staleness = learner_version - min_version``.
    """

    prompt_id: str
    task: str
    domain: str
    prompt_token_ids: np.ndarray
    """(P,) int32."""
    samples: list[Sample]
    generator_id: int
    seq: int
    """The id of the learner's :class:`GroupRequest` this group answers."""
    min_version: int | None = None
    max_version: int | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = np.asarray(self.prompt_token_ids, dtype=np.int32)
        if self.min_version is None or self.max_version is None:
            spans = [(int(s.versions.min()), int(s.versions.max())) for s in self.samples if len(s.versions)]
            if not spans:
                raise ValueError("min_version/max_version must be given for a group without response tokens")
            self.min_version = min(lo for lo, _ in spans) if self.min_version is None else self.min_version
            self.max_version = max(hi for _, hi in spans) if self.max_version is None else self.max_version

    @property
    def rewards(self) -> np.ndarray:
        """(n,) float64 rewards of the samples."""
        return np.array([s.reward for s in self.samples], dtype=np.float64)

    @property
    def num_tokens(self) -> int:
        """Response tokens over all samples."""
        return sum(len(s.token_ids) for s in self.samples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrajectoryGroup):
            return NotImplemented
        return (
            (self.prompt_id, self.task, self.domain, self.generator_id, self.seq, self.min_version, self.max_version)
            == (
                other.prompt_id,
                other.task,
                other.domain,
                other.generator_id,
                other.seq,
                other.min_version,
                other.max_version,
            )
            and np.array_equal(self.prompt_token_ids, other.prompt_token_ids)
            and self.samples == other.samples
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class WeightsReady:
    """Learner -> generators: weights of ``version`` are being broadcast; tokens after loading carry it.

    ``max_staleness``: the admission bound from now on, under ``buffer.max_staleness = "auto"`` (absent from the
    wire when None: a fixed bound is the config's)."""

    version: int
    max_staleness: int | None = None


@dataclass(frozen=True)
class Stop:
    """Learner -> generators: finish and exit."""

    reason: str = ""


@dataclass(frozen=True)
class Validate:
    """Learner -> generators: sample the held-out split with weights of ``version`` or newer, score, report.

    ``round`` numbers the learner's requests (one per periodic validation); a generator answers each
    ``(version, round)`` once, with :class:`ValidationAnswer` messages on the groups socket
    (:mod:`prorl_async.eval.validation`).
    """

    version: int
    round: int


@dataclass(frozen=True)
class Heartbeat:
    """Liveness of ``source`` at wall-clock ``time_s``."""

    source: str
    time_s: float


@dataclass(frozen=True)
class Ready:
    """First message of a generator process on the groups socket, after its control socket is live (handshake).

    Sent once per process: a ``Ready`` from a generator id the learner knows means that generator restarted, and
    the requests its previous process held will never be answered."""

    source: str


@dataclass(frozen=True)
class GroupRequest:
    """Learner -> generator ``generator_id``: sample one group for problem ``index`` of task spec ``spec``.

    The learner owns the prompt order and admission; a generator keeps nothing a restart must restore. The
    generator starts the request once its weights are at least ``min_version`` and answers it exactly once, with
    the :class:`TrajectoryGroup` (``seq = request_id``) or a :class:`RequestReturned`.

    ``level``: the spec's curriculum level to draw the problem at (0: the spec's own params). Left off the wire when
    0, so a request without it (from before curricula) means level 0."""

    generator_id: int
    request_id: int
    spec: int
    index: int
    epoch: int
    min_version: int
    level: int = 0


@dataclass(frozen=True)
class RequestReturned:
    """Generator -> learner: request ``request_id`` ends without a group (``reason``: ``stale``, ``too_long``,
    ``stopped``, ``failed``); the learner hands its prompt out again (``too_long``: counts it, skips it)."""

    source: str
    generator_id: int
    request_id: int
    reason: str


@dataclass(frozen=True)
class Status:
    """A generator's (or any process's) figures: named numbers, nothing else."""

    source: str
    values: dict[str, int | float] = field(default_factory=dict)


@dataclass(eq=False)
class ValidationAnswer:
    """Generator -> learner: part ``part`` of ``parts`` of its shard's answer to ``Validate(version, round)``.

    Prompt ``i`` is ``prompt_ids[i]`` of task label ``tasks[i]`` with ``counts[i]`` rewards, consecutive in
    ``rewards`` (the semantic checks, and the bookkeeping, are :mod:`prorl_async.eval.validation`'s)."""

    source: str
    version: int
    round: int
    generator: int
    generators: int
    part: int
    parts: int
    weights_version: int
    """Lowest weight version any sampled token of the shard was drawn under."""
    weights_version_last: int
    """Highest: the learner keeps training while a shard is sampled, so a shard can span versions."""
    seconds: float
    failed: int
    skipped: int
    prompt_ids: list[str]
    tasks: list[str]
    counts: np.ndarray
    """(prompts,) int32 samples per prompt."""
    rewards: np.ndarray
    """(sum(counts),) float64."""

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int32)
        self.rewards = np.asarray(self.rewards, dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ValidationAnswer):
            return NotImplemented
        arrays = ("counts", "rewards")
        return (all(np.array_equal(getattr(self, k), getattr(other, k)) for k in arrays)
                and {k: v for k, v in self.__dict__.items() if k not in arrays}
                == {k: v for k, v in other.__dict__.items() if k not in arrays})

    __hash__ = None  # type: ignore[assignment]


Message = (TrajectoryGroup | WeightsReady | Stop | Validate | Heartbeat | Ready | Status | GroupRequest
           | RequestReturned | ValidationAnswer)

# ------------------------------------------------------------------------------------------ encoding

_I32, _F32, _F64 = np.dtype("<i4"), np.dtype("<f4"), np.dtype("<f8")


def _arr(values: np.ndarray, dtype: np.dtype) -> list[Any]:
    data = np.ascontiguousarray(values, dtype=dtype)
    return [dtype.str, int(data.shape[0]), memoryview(data).cast("B")]


def _flat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


def _encode_group(g: TrajectoryGroup) -> dict[str, Any]:
    s = g.samples
    return {
        "prompt_id": g.prompt_id,
        "task": g.task,
        "domain": g.domain,
        "prompt_token_ids": _arr(g.prompt_token_ids, _I32),
        "generator_id": g.generator_id,
        "seq": g.seq,
        "min_version": g.min_version,
        "max_version": g.max_version,
        "lengths": _arr(np.array([len(x.token_ids) for x in s], dtype=_I32), _I32),
        "token_ids": _arr(_flat([x.token_ids for x in s], _I32), _I32),
        "logprobs": _arr(_flat([x.logprobs for x in s], _F32), _F32),
        "versions": _arr(_flat([x.versions for x in s], _I32), _I32),
        "rewards": _arr(np.array([x.reward for x in s], dtype=_F64), _F64),
        "finish_reasons": [x.finish_reason for x in s],
        "reward_reasons": [x.reward_reason for x in s],
    }


_TYPE_OF: dict[type, bytes] = {
    TrajectoryGroup: b"G",
    WeightsReady: b"W",
    Stop: b"S",
    Validate: b"V",
    Heartbeat: b"H",
    Status: b"M",
    Ready: b"R",
    GroupRequest: b"Q",
    RequestReturned: b"X",
    ValidationAnswer: b"A",
}


def encode(msg: Message) -> list[bytes]:
    """The two frames of ``msg``; cheap (no validation beyond dtype casts: the receiver validates)."""
    kind = _TYPE_OF.get(type(msg))
    if kind is None:
        raise TypeError(f"not a message: {type(msg).__name__}")
    if isinstance(msg, TrajectoryGroup):
        body = _encode_group(msg)
    elif isinstance(msg, Status):
        body = {"source": msg.source, "values": dict(msg.values)}
    elif isinstance(msg, ValidationAnswer):
        body = {k: v for k, v in msg.__dict__.items() if k not in ("counts", "rewards")}
        body.update(counts=_arr(msg.counts, _I32), rewards=_arr(msg.rewards, _F64))
    else:
        body = {k: v for k, v in msg.__dict__.items() if v is not None}  # None: an optional field left out
        if isinstance(msg, GroupRequest) and msg.level == 0:
            del body["level"]  # level 0: the request of before curricula
    body["v"] = SCHEMA_VERSION
    return [kind, _packer().pack(body)]


_local = threading.local()


def _packer() -> msgpack.Packer:
    """A per-thread packer: reusing its buffer makes large groups several times cheaper than ``packb``, which
    allocates a fresh buffer on every call."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer()
    return packer


# ------------------------------------------------------------------------------------------ decoding


class _Body:
    """Typed access to a decoded map; every getter raises MessageError on a wrong type or limit."""

    def __init__(self, m: dict[str, Any], keys: frozenset[str], limits: Limits) -> None:
        if m.keys() != keys:
            missing, extra = sorted(keys - m.keys()), sorted(m.keys() - keys)
            raise MessageError("field", f"missing {missing}, unexpected {extra}")
        self.m, self.limits = m, limits

    def text(self, key: str) -> str:
        v = self.m[key]
        if type(v) is not str:
            raise MessageError("field", f"{key} must be a string, got {type(v).__name__}")
        if len(v) > self.limits.max_string_chars:
            raise MessageError("size", f"{key} has {len(v)} characters (limit {self.limits.max_string_chars})")
        return v

    def integer(self, key: str) -> int:
        v = self.m[key]
        if type(v) is not int:
            raise MessageError("field", f"{key} must be an integer, got {type(v).__name__}")
        if v < 0:
            raise MessageError("version" if "version" in key else "value", f"{key} is negative ({v})")
        return v

    def number(self, key: str) -> float:
        v = self.m[key]
        if type(v) not in (int, float):
            raise MessageError("field", f"{key} must be a number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise MessageError("nonfinite", f"{key} is {v}")
        return float(v)

    def texts(self, key: str, n: int) -> list[str]:
        v = self.m[key]
        if type(v) is not list or len(v) != n:
            raise MessageError("field", f"{key} must be a list of {n} strings")
        limit = self.limits.max_string_chars
        if any(type(x) is not str or len(x) > limit for x in v):
            raise MessageError("field", f"{key} must hold strings of at most {limit} characters")
        return v

    def array(self, key: str, dtype: np.dtype, limit: int) -> np.ndarray:
        v = self.m[key]
        if type(v) is not list or len(v) != 3:
            raise MessageError("field", f"{key} must be [dtype, length, bytes]")
        dt, n, data = v
        if dt != dtype.str:
            raise MessageError("array", f"{key} has dtype {dt!r}, expected {dtype.str!r}")
        if type(n) is not int or n < 0:
            raise MessageError("array", f"{key} declares length {n!r}")
        if n > limit:
            raise MessageError("size", f"{key} declares {n} elements (limit {limit})")
        if type(data) is not bytes or len(data) != n * dtype.itemsize:
            raise MessageError("array", f"{key}: {n} x {dtype.str} does not match the data")
        return np.frombuffer(data, dtype=dtype)


_GROUP_KEYS = frozenset(
    {
        "v",
        "prompt_id",
        "task",
        "domain",
        "prompt_token_ids",
        "generator_id",
        "seq",
        "min_version",
        "max_version",
        "lengths",
        "token_ids",
        "logprobs",
        "versions",
        "rewards",
        "finish_reasons",
        "reward_reasons",
    }
)


def _check_tokens(key: str, ids: np.ndarray, vocab_size: int | None) -> None:
    # One pass: viewed as uint32, a negative id is >= 2**31, above any vocabulary.
    if len(ids) and ids.view(np.uint32).max() >= (vocab_size if vocab_size is not None else 1 << 31):
        raise MessageError("token", f"{key} outside [0, {vocab_size if vocab_size is not None else 2**31})")


def _sample(
    ids: np.ndarray, logprobs: np.ndarray, versions: np.ndarray, finish: str, reward: float, why: str
) -> Sample:
    """A Sample from already-typed arrays, skipping ``__post_init__``: decode builds thousands per second."""
    s = object.__new__(Sample)
    s.__dict__.update(
        token_ids=ids, logprobs=logprobs, versions=versions, finish_reason=finish, reward=reward, reward_reason=why
    )
    return s


def _decode_group(b: _Body) -> TrajectoryGroup:
    # Per-sample bookkeeping in Python lists (n is small); per-token checks are whole-group numpy reductions.
    lim = b.limits
    prompt = b.array("prompt_token_ids", _I32, lim.max_prompt_tokens)
    lengths = b.array("lengths", _I32, lim.max_samples).tolist()
    n = len(lengths)
    if n == 0:
        raise MessageError("value", "a group needs at least one sample")
    if min(lengths) < 0 or max(lengths) > lim.max_response_tokens:
        raise MessageError("size", f"sample lengths must be in [1, {lim.max_response_tokens}]")
    if min(lengths) == 0 or not len(prompt):  # nothing to train on: the learner would refuse the whole batch
        raise MessageError("value", "a group needs a non-empty prompt and samples of at least one token")
    ends = list(itertools.accumulate(lengths))
    total = ends[-1]
    ids, logprobs, versions = (
        b.array(k, d, total) for k, d in (("token_ids", _I32), ("logprobs", _F32), ("versions", _I32))
    )
    if not len(ids) == len(logprobs) == len(versions) == total:
        raise MessageError(
            "value", f"lengths add up to {total}, arrays hold {len(ids)}/{len(logprobs)}/{len(versions)}"
        )
    _check_tokens("prompt_token_ids", prompt, lim.vocab_size)
    _check_tokens("token_ids", ids, lim.vocab_size)
    if total and not (logprobs.max() <= 0 and logprobs.min() > -np.inf):  # NaN fails both comparisons
        raise MessageError("logprob", "log-probs must be finite and <= 0")
    min_v, max_v = b.integer("min_version"), b.integer("max_version")
    _check_versions(versions, ends, min_v, max_v)
    rewards = b.array("rewards", _F64, lim.max_samples).tolist()
    if len(rewards) != n:
        raise MessageError("value", f"{len(rewards)} rewards for {n} samples")
    if not all(map(math.isfinite, rewards)):
        raise MessageError("nonfinite", "rewards must be finite")
    finish, why = b.texts("finish_reasons", n), b.texts("reward_reasons", n)
    samples = [
        _sample(ids[e - k : e], logprobs[e - k : e], versions[e - k : e], finish[i], rewards[i], why[i])
        for i, (k, e) in enumerate(zip(lengths, ends, strict=True))
    ]
    return TrajectoryGroup(
        prompt_id=b.text("prompt_id"),
        task=b.text("task"),
        domain=b.text("domain"),
        prompt_token_ids=prompt,
        samples=samples,
        generator_id=b.integer("generator_id"),
        seq=b.integer("seq"),
        min_version=min_v,
        max_version=max_v,
    )


def _check_versions(versions: np.ndarray, ends: list[int], min_v: int, max_v: int) -> None:
    if min_v > max_v:
        raise MessageError("version", f"min_version {min_v} > max_version {max_v}")
    if not len(versions):
        return
    lo, hi = int(versions.min()), int(versions.max())
    if (lo, hi) != (min_v, max_v):
        raise MessageError("version", f"tokens span versions [{lo}, {hi}], header says [{min_v}, {max_v}]")
    # Index j compares tokens j and j+1. A decrease is allowed only across samples: at j = end - 1.
    drops = np.flatnonzero(versions[1:] < versions[:-1]).tolist()
    if drops and not {j + 1 for j in drops} <= set(ends):
        raise MessageError("version", "policy versions decrease within a sample")


def _decode_status(b: _Body) -> Status:
    values = b.m["values"]
    if type(values) is not dict:
        raise MessageError("field", "values must be a map")
    if len(values) > b.limits.max_metrics:
        raise MessageError("size", f"{len(values)} values (limit {b.limits.max_metrics})")
    limit = b.limits.max_string_chars
    for k, v in values.items():
        if type(k) is not str or len(k) > limit or type(v) not in (int, float, bool):
            raise MessageError("field", "a status maps names to numbers")
        if type(v) is float and not math.isfinite(v):
            raise MessageError("nonfinite", f"status value {k} is {v}")
    return Status(source=b.text("source"), values=values)


_ANSWER_KEYS = frozenset({"v", "source", "version", "round", "generator", "generators", "part", "parts",
                          "weights_version", "weights_version_last", "seconds", "failed", "skipped", "prompt_ids",
                          "tasks", "counts", "rewards"})


def _decode_answer(b: _Body) -> ValidationAnswer:
    ints = {k: b.integer(k) for k in ("version", "round", "generator", "generators", "part", "parts",
                                      "weights_version", "weights_version_last", "failed", "skipped")}
    counts = b.array("counts", _I32, b.limits.max_metrics)
    n = len(counts)
    if n and int(counts.min()) < 1:
        raise MessageError("value", "every validated prompt needs at least one reward")
    total = int(counts.astype(np.int64).sum())
    rewards = b.array("rewards", _F64, b.limits.max_message_bytes // _F64.itemsize)  # bounded by the frame
    if len(rewards) != total:
        raise MessageError("value", f"{total} rewards announced, {len(rewards)} sent")
    if not np.isfinite(rewards).all():
        raise MessageError("nonfinite", "a validation reward is not finite")
    seconds = b.number("seconds")
    if seconds < 0:
        raise MessageError("value", f"seconds is negative ({seconds})")
    return ValidationAnswer(source=b.text("source"), **ints, seconds=seconds, prompt_ids=b.texts("prompt_ids", n),
                            tasks=b.texts("tasks", n), counts=counts, rewards=rewards)


_REQUEST_INTS = ("generator_id", "request_id", "spec", "index", "epoch", "min_version")

# Messages with an optional field, present: decoded with a key set of their own (every key set is exact).
_WITH_OPTIONAL: dict[bytes, tuple[str, frozenset[str], Any]] = {
    b"W": ("max_staleness", frozenset({"v", "version", "max_staleness"}),
           lambda b: WeightsReady(version=b.integer("version"), max_staleness=b.integer("max_staleness"))),
    b"Q": ("level", frozenset({"v", *_REQUEST_INTS, "level"}),
           lambda b: GroupRequest(**{k: b.integer(k) for k in (*_REQUEST_INTS, "level")})),
}

_DECODERS: dict[bytes, tuple[frozenset[str], Any]] = {
    b"G": (_GROUP_KEYS, _decode_group),
    b"W": (frozenset({"v", "version"}), lambda b: WeightsReady(version=b.integer("version"))),
    b"S": (frozenset({"v", "reason"}), lambda b: Stop(reason=b.text("reason"))),
    b"V": (
        frozenset({"v", "version", "round"}),
        lambda b: Validate(version=b.integer("version"), round=b.integer("round")),
    ),
    b"H": (
        frozenset({"v", "source", "time_s"}),
        lambda b: Heartbeat(source=b.text("source"), time_s=b.number("time_s")),
    ),
    b"M": (frozenset({"v", "source", "values"}), _decode_status),
    b"R": (frozenset({"v", "source"}), lambda b: Ready(source=b.text("source"))),
    b"Q": (frozenset({"v", *_REQUEST_INTS}), lambda b: GroupRequest(**{k: b.integer(k) for k in _REQUEST_INTS})),
    b"X": (
        frozenset({"v", "source", "generator_id", "request_id", "reason"}),
        lambda b: RequestReturned(source=b.text("source"), generator_id=b.integer("generator_id"),
                                  request_id=b.integer("request_id"), reason=b.text("reason")),
    ),
    b"A": (_ANSWER_KEYS, _decode_answer),
}


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and decode the frames of one message (bytes, memoryviews or zmq Frames).

    Raises :class:`MessageError` — and nothing else — for any input that is not a valid message.
    """
    if len(frames) != 2:
        raise MessageError("frames", f"expected 2 frames, got {len(frames)}")
    head, payload = memoryview(frames[0]), memoryview(frames[1])
    if head.nbytes != 1:
        raise MessageError("frames", f"frame 0 must be one byte, got {head.nbytes}")
    entry = _DECODERS.get(head.tobytes())
    if entry is None:
        raise MessageError("type", f"unknown message type {head.tobytes()!r}")
    if payload.nbytes > limits.max_message_bytes:
        raise MessageError("size", f"{payload.nbytes} bytes (limit {limits.max_message_bytes})")
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as err:  # msgpack raises many types (ValueError, ExtraData, StackError, UnicodeDecodeError)
        raise MessageError("msgpack", f"{type(err).__name__}: {err}") from None
    if type(body) is not dict:
        raise MessageError("msgpack", f"frame 1 must be a map, got {type(body).__name__}")
    if body.get("v") != SCHEMA_VERSION or type(body.get("v")) is not int:
        raise MessageError("schema", f"schema version {body.get('v')!r}, expected {SCHEMA_VERSION}")
    keys, decoder = entry
    optional = _WITH_OPTIONAL.get(head.tobytes())
    if optional is not None and optional[0] in body:
        keys, decoder = optional[1], optional[2]
    return decoder(_Body(body, keys, limits))
