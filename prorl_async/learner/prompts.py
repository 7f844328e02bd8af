"""Which prompt a generator starts next, and whether it may start one now.

:class:`PromptSampler` — the prompt order. Pure state, no I/O, no clock.

- Deterministic from ``(seed, shard, num_shards, sizes)``, its position and the weights in force at each draw: a draw
  picks a task spec by weight with an RNG seeded by ``(seed, shard, draw number)``, then the spec's next problem.
  The weights start as the config's and may be replaced (:meth:`PromptSampler.set_weights`, by the task balance);
  they are not part of the sampler's state: whoever sets them restores them (so a state restores whatever the
  weights, and checkpoints written before the balance load as they are).
- Epochs and shards: per spec, epoch ``e`` is a permutation of its training split seeded by ``(seed, spec, e)``
  — the same in every generator. Shard ``g`` of ``N`` owns the permutation's positions ``g, g+N, g+2N, ...``,
  so within one epoch of a spec no problem is drawn twice, neither by one generator nor by two.
- Re-queue: a prompt whose group did not finish (aborted as too stale, interrupted by a stop) is handed back
  with :meth:`PromptSampler.requeue` and is drawn again before any new one.
- :meth:`PromptSampler.state` is plain data (JSON-able): the position, the re-queued draws and the draws the
  caller still has in flight (they are re-queued on restore), so a resumed generator loses none of them.

:class:`Admission` — DESIGN.md section 4, kept by the learner. With ``K = max_staleness`` and ``v`` the
learner's version, a request holds a slot of the version expected to consume its group (a target in
``[v, loaded + K]``, ``budget / (K + 1)`` slots each), freed when the learner passes it; a new request is issued
only while a slot is free and the held slots stay below ``budget`` = ``(K + 1) x batch_groups`` (or
``generator.admission_groups`` per generator).

:class:`PromptSource` — both, plus the requests in flight: what the learner hands to generators, and the three things
that keep its groups informative (all fed by every requested group that arrives, all checkpointed with the order):

- the curriculum (:class:`~prorl_async.envs.curriculum.Curriculum`): each request asks for its spec's current level
  (``Request.level``, sent as ``GroupRequest.level``); the arriving group's pass rate moves that level;
- prompt skipping (:class:`~prorl_async.learner.skips.PromptSkips`): a fresh draw (not a re-queued one) of a prompt
  whose recent groups had equal rewards may be passed over; the draw is consumed, as if answered, and the prompt
  comes again next epoch;
- the task balance (:class:`~prorl_async.learner.balance.TaskBalance`): each arriving group counts as informative or
  not for its spec, and the sampler draws specs by the shares that follow (configured weight x informative rate,
  with a floor).

Usage::

    sampler = PromptSampler(seed=0, shard=0, num_shards=1, sizes=[mix.train_size(i) ...], weights=[...])
    draw = sampler.next()                      # Draw(spec=0, index=4711, epoch=0)
    sampler.requeue(draw)                      # its group was aborted: draw it again first
    saved = sampler.state(in_flight=[...])     # JSON-able; PromptSampler(...).restore(saved)

    source = PromptSource(sampler, Admission(budget=16, max_staleness=1), per_generator=8, curriculum=..., skips=...,
                          balance=...)
    request_id, draw, min_version = source.issue(generator=0, learner_version=3, loaded_version=3)
    change = source.observe(source.answered(request_id, kept=True), rewards)  # a LevelChange, or None

    admission = Admission(budget=16, max_staleness=1)
    if admission.may_start(learner_version=3, loaded_version=3):
        target = admission.start(3, 3)          # the version expected to consume the group
        ...                                    # admission.withdraw(target) if it is aborted or filtered
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prorl_async.envs.curriculum import Curriculum, LevelChange
from prorl_async.learner.balance import TaskBalance
from prorl_async.learner.skips import PromptSkips

STATE_VERSION = 1


@dataclass(frozen=True)
class Draw:
    """One prompt: problem ``index`` of task spec ``spec``'s training split, drawn in that spec's ``epoch``."""

    spec: int
    index: int
    epoch: int

    def as_list(self) -> list[int]:
        return [self.spec, self.index, self.epoch]


class PromptSampler:
    """Deterministic, sharded, checkpointable prompt order over a weighted mix of task specs."""

    def __init__(self, seed: int, shard: int, num_shards: int, sizes: Sequence[int], weights: Sequence[float]) -> None:
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}) (got {shard})")
        if not sizes:
            raise ValueError(f"need at least one spec (sizes {sizes}, weights {weights})")
        self.seed, self.shard, self.num_shards = seed, shard, num_shards
        self.sizes = list(sizes)
        self.set_weights(weights)
        self._shares = [len(range(shard, size, num_shards)) for size in self.sizes]
        if min(self._shares) == 0:
            spec = self._shares.index(0)
            raise ValueError(
                f"task spec {spec} has {self.sizes[spec]} training problems, fewer than the {num_shards} generators "
                "that share it: raise tasks.train_size or use fewer generators"
            )
        self.draws = 0  # draws taken from the stream (re-queued ones excluded)
        self.positions = [0] * len(self.sizes)  # this shard's draws per spec, over all epochs
        self._requeued: deque[Draw] = deque()
        self._perm: dict[int, tuple[int, list[int]]] = {}  # spec -> (epoch, permutation), the latest only

    def set_weights(self, weights: Sequence[float]) -> None:
        """Pick specs by ``weights`` (one per spec, each finite and > 0; only their ratios matter) from the next draw
        on; the problem order within each spec is untouched."""
        if len(weights) != len(self.sizes):
            raise ValueError(f"need one weight per spec (sizes {self.sizes}, weights {list(weights)})")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"spec weights must be > 0 (got {list(weights)})")
        self.weights = [float(w) for w in weights]
        self._cumulative = [sum(self.weights[: i + 1]) for i in range(len(self.weights))]

    @property
    def requeued(self) -> int:
        """Draws waiting to be drawn again."""
        return len(self._requeued)

    def next(self) -> Draw:
        """The next prompt: a re-queued one first, else the stream's next draw."""
        if self._requeued:
            return self._requeued.popleft()
        rng = random.Random(f"{self.seed}/{self.shard}/draw/{self.draws}")
        spec = min(bisect.bisect_right(self._cumulative, rng.random() * self._cumulative[-1]), len(self.sizes) - 1)
        self.draws += 1
        position = self.positions[spec]
        self.positions[spec] += 1
        epoch, k = divmod(position, self._shares[spec])
        return Draw(spec, self._permutation(spec, epoch)[self.shard + k * self.num_shards], epoch)

    def requeue(self, draw: Draw) -> None:
        """Hand back a draw whose group did not finish; it comes out of :meth:`next` before new ones."""
        self._requeued.append(draw)

    def _permutation(self, spec: int, epoch: int) -> list[int]:
        cached = self._perm.get(spec)
        if cached is None or cached[0] != epoch:
            order = list(range(self.sizes[spec]))
            random.Random(f"{self.seed}/{spec}/epoch/{epoch}").shuffle(order)
            cached = self._perm[spec] = (epoch, order)
        return cached[1]

    def state(self, in_flight: Iterable[Draw] = ()) -> dict[str, Any]:
        """Plain data to resume from; ``in_flight`` draws (started, not finished) are saved as re-queued."""
        return {
            "state_version": STATE_VERSION,
            "seed": self.seed,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "sizes": list(self.sizes),
            "draws": self.draws,
            "positions": list(self.positions),
            "requeued": [d.as_list() for d in (*in_flight, *self._requeued)],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`; raises ``ValueError`` if it belongs to another seed, shard or split."""
        if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
            raise ValueError(f"prompt sampler state: expected a map with state_version {STATE_VERSION}")
        for key in ("seed", "shard", "num_shards", "sizes"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"prompt sampler state has {key}={state.get(key)!r}, this run {getattr(self, key)!r}")
        draws, positions, requeued = state.get("draws"), state.get("positions"), state.get("requeued")
        ok = isinstance(draws, int) and draws >= 0 and isinstance(positions, list) and isinstance(requeued, list)
        if not ok or len(positions) != len(self.sizes) or not all(isinstance(p, int) and p >= 0 for p in positions):
            raise ValueError("prompt sampler state: bad draws or positions")
        restored = deque()
        for item in requeued:
            valid = isinstance(item, list) and len(item) == 3 and all(isinstance(x, int) for x in item)
            if not valid or not 0 <= item[0] < len(self.sizes) or not 0 <= item[1] < self.sizes[item[0]]:
                raise ValueError(f"prompt sampler state: bad re-queued draw {item!r}")
            restored.append(Draw(*item))
        self.draws, self.positions, self._requeued = draws, list(positions), restored


# ------------------------------------------------------------------------------------------ admission


class Admission:
    """Admission slots per *target* version: whether one more group may start (module docstring).

    Each started group takes a slot of the learner version expected to consume it: the smallest target
    ``t >= v`` (the learner's latest version) with a free slot, at most ``per_version = ceil(budget / (K + 1))``
    slots per target and ``t <= loaded + K`` (a group started on the loaded weights must not arrive staler
    than K). Slots of targets below ``v`` are freed as the learner moves on, whether their groups were consumed
    or dropped: about one batch's worth per learner step. So a generator that is faster than the learner stays
    at most K + 1 batches ahead and then starts one batch per step, each group consumed as it becomes due;
    counting slots by *start* version instead released a whole version's groups at once every K + 1 steps, and
    a generator that started its whole budget on one version sat idle through the next step (measured: with
    K = 1 every other step waited ~12 s for a fresh batch, async 1.11x over sync against an ideal 1.47x).

    ``ceiling`` (default: ``max_staleness``) is the staleness the learner still accepts: under
    ``max_staleness = "auto"`` the bound moves (:meth:`set_bound`) below a fixed ceiling, and a group started
    under a larger bound is not aborted until the ceiling makes it useless.
    """

    def __init__(self, budget: int, max_staleness: int, ceiling: int | None = None) -> None:
        ceiling = max_staleness if ceiling is None else ceiling
        if budget < 1 or not 0 <= max_staleness <= ceiling:
            raise ValueError(f"need budget >= 1 and 0 <= max_staleness <= ceiling (got {budget}, {max_staleness}, "
                             f"{ceiling})")
        self.budget, self.max_staleness, self.ceiling = budget, max_staleness, ceiling
        self._slots: Counter[int] = Counter()  # target version -> groups holding one of its slots

    @property
    def per_version(self) -> int:
        return -(-self.budget // (self.max_staleness + 1))

    def set_bound(self, max_staleness: int, budget: int) -> None:
        """A new bound (and the budget that goes with it) announced by the learner."""
        if budget < 1 or not 0 <= max_staleness <= self.ceiling:
            raise ValueError(f"bound {max_staleness} outside [0, {self.ceiling}] or budget {budget} < 1")
        self.max_staleness, self.budget = max_staleness, budget

    def oldest_usable(self, learner_version: int) -> int:
        """The oldest start version still usable at ``learner_version`` under the current bound."""
        return learner_version - self.max_staleness

    def oldest_kept(self, learner_version: int) -> int:
        """The oldest start version the learner still accepts (the ceiling): older groups are aborted."""
        return learner_version - self.ceiling

    def counted(self, learner_version: int) -> int:
        """Groups holding a slot of a version the learner has not passed yet."""
        return sum(n for t, n in self._slots.items() if t >= learner_version)

    def _target(self, learner_version: int, loaded_version: int) -> int | None:
        if loaded_version < self.oldest_usable(learner_version) or self.counted(learner_version) >= self.budget:
            return None
        for t in range(learner_version, loaded_version + self.max_staleness + 1):
            if self._slots[t] < self.per_version:
                return t
        return None

    def may_start(self, learner_version: int, loaded_version: int) -> bool:
        return self._target(learner_version, loaded_version) is not None

    def start(self, learner_version: int, loaded_version: int) -> int:
        """Take a slot for a group started on ``loaded_version``; returns its target (give it to :meth:`withdraw`)."""
        target = self._target(learner_version, loaded_version)
        if target is None:
            raise RuntimeError("Admission.start without a free slot: check may_start first")
        self._slots[target] += 1
        return target

    def withdraw(self, target: int) -> None:
        """A group holding a slot of ``target`` was aborted or will be filtered out: its slot is free again."""
        if self._slots[target] > 0:
            self._slots[target] -= 1

    def forget_before(self, learner_version: int) -> None:
        """Free the slots of versions the learner has passed (keeps the counter small)."""
        for t in [t for t in self._slots if t < learner_version]:
            del self._slots[t]


# ------------------------------------------------------------------------------------------ dispatch


@dataclass
class Request:
    """A prompt handed to a generator and not answered yet; it holds admission slot ``target`` and asks for its
    spec's curriculum ``level`` as it was when the request was issued."""

    generator: int
    draw: Draw
    target: int
    level: int = 0


class PromptSource:
    """The learner's prompt order, admission and requests in flight: who samples what next.

    Invariants (DESIGN.md section 4, with the learner as the one owner of prompts):

    - every draw is in exactly one place: the sampler's stream (not drawn yet), its re-queue, or
      :attr:`inflight` (handed out, no answer yet). An answer (group or return) takes it out of flight; a
      returned or orphaned draw goes back to the re-queue, so a prompt is trained on at most once per draw
      and never lost;
    - a request holds an admission slot of the learner version expected to consume it (:class:`Admission`,
      capacity ``(K + 1) x batch_groups``) until the learner passes that version, or until its group is
      dropped by the buffer, or it is returned;
    - each generator holds at most ``per_generator`` requests (its engine's groups plus as many queued, so that
      its engine never waits for the learner's next request);
    - a draw passed over by :attr:`skips` has left the stream like an answered one (its epoch goes on without it);
      a re-queued draw is never passed over;
    - while :attr:`balance` is active, the sampler picks specs by ``balance.weights()``: set after every group it
      observes and on restore, so the weights are always a function of the balance's windows;
    - :meth:`state` is plain data (JSON-able): the sampler position with every request in flight re-queued, the
      next request id, the curriculum's levels and windows, the skip records and the balance's windows, so that a
      resume hands out exactly the prompts not answered before, at the same levels, passing over the same ones,
      drawing specs by the same weights.

    ``curriculum``, ``skips`` and ``balance`` default to none: every spec at level 0, nothing passed over, specs
    drawn by the sampler's own weights.
    """

    def __init__(self, sampler: PromptSampler, admission: Admission, per_generator: int,
                 curriculum: Curriculum | None = None, skips: PromptSkips | None = None,
                 balance: TaskBalance | None = None) -> None:
        if per_generator < 1:
            raise ValueError(f"per_generator must be >= 1 (got {per_generator})")
        specs = len(sampler.sizes)
        curriculum = curriculum if curriculum is not None else Curriculum([1] * specs)
        skips = skips if skips is not None else PromptSkips(sampler.seed, [False] * specs)
        balance = balance if balance is not None else TaskBalance(sampler.weights, [str(i) for i in range(specs)],
                                                                  enabled=False)
        if len(curriculum.counts) != specs or len(skips.eligible) != specs or len(balance.base) != specs:
            raise ValueError(f"the curriculum, the skips and the balance must cover the sampler's {specs} specs")
        self.sampler, self.admission, self.per_generator = sampler, admission, per_generator
        self.curriculum, self.skips, self.balance = curriculum, skips, balance
        self._apply_balance()
        self.inflight: dict[int, Request] = {}
        self.next_id = 0
        self.counts: Counter[str] = Counter()  # requests by fate: issued, answered, returned_<reason>, orphaned

    def held(self, generator: int) -> int:
        return sum(r.generator == generator for r in self.inflight.values())

    def issue(self, generator: int, learner_version: int, loaded_version: int) -> tuple[int, Draw, int] | None:
        """The next request for ``generator`` as ``(request_id, draw, min_version)``, or None when admission or the
        generator's share says wait. ``loaded_version``: the newest weights the generators hold (or receive)."""
        if self.held(generator) >= self.per_generator or not self.admission.may_start(learner_version,
                                                                                       loaded_version):
            return None
        target = self.admission.start(learner_version, loaded_version)
        draw = self._next_draw()
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.inflight[request_id] = Request(generator, draw, target, self.curriculum.level(draw.spec))
        self.counts["issued"] += 1
        return request_id, draw, max(0, self.admission.oldest_usable(learner_version))

    def _next_draw(self) -> Draw:
        """The sampler's next draw; a fresh one may be passed over (:attr:`skips`), at most ``max_per_draw`` in a
        row: then the next one is handed out whatever its record."""
        if self.sampler.requeued:
            return self.sampler.next()
        draw = self.sampler.next()
        for _ in range(self.skips.max_per_draw if self.skips.enabled else 0):
            if not self.skips.skip(draw.spec, self.curriculum.level(draw.spec), draw.index, self.sampler.draws):
                break
            draw = self.sampler.next()  # nothing was re-queued meanwhile: the stream's next draw
        return draw

    def observe(self, request: Request, rewards: Sequence[float]) -> LevelChange | None:
        """The group that answered ``request`` (kept or dropped) had ``rewards``: its pass rate (mean reward) feeds
        the curriculum at the request's level, its variance the prompt's skip record and its spec's balance window
        (and so the weights of the next draws); returns the level move it causes. A group without rewards, or with
        one that is not finite, says nothing."""
        values = [float(r) for r in rewards]
        if not values or not all(map(math.isfinite, values)):
            return None
        spec, index = request.draw.spec, request.draw.index
        self.skips.observe(spec, request.level, index, values)
        self.balance.observe(spec, values)
        self._apply_balance()
        return self.curriculum.observe(spec, request.level, sum(values) / len(values))

    def _apply_balance(self) -> None:
        """The sampler picks specs by the balance's weights (while it is active; else it keeps its own)."""
        if self.balance.active:
            self.sampler.set_weights(self.balance.weights())

    def answered(self, request_id: int, *, kept: bool) -> Request | None:
        """A group answered ``request_id``; ``kept``: the buffer took it (else its slot is free again).

        None for an id not in flight (answered already, or handed out again after its generator restarted):
        the caller drops that group, since the prompt's current request will answer it."""
        request = self.inflight.pop(request_id, None)
        if request is None:
            return None
        self.counts["answered"] += 1
        if not kept:
            self.admission.withdraw(request.target)
        return request

    def returned(self, request_id: int, reason: str) -> Request | None:
        """``request_id`` ended without a group; its prompt is drawn again (``too_long``: skipped for good)."""
        request = self.inflight.pop(request_id, None)
        if request is None:
            return None
        self.counts[f"returned_{reason}"] += 1
        self.admission.withdraw(request.target)
        if reason != "too_long":
            self.sampler.requeue(request.draw)
        return request

    def orphan(self, generator: int) -> int:
        """``generator`` restarted: the requests its previous process held go back to the queue; how many."""
        lost = [i for i, r in self.inflight.items() if r.generator == generator]
        for i in lost:
            request = self.inflight.pop(i)
            self.admission.withdraw(request.target)
            self.sampler.requeue(request.draw)
        self.counts["orphaned"] += len(lost)
        return len(lost)

    def state(self) -> dict[str, Any]:
        """Plain data to resume from: requests in flight are re-queued (their groups, if they still come, are
        after the checkpoint and are not kept)."""
        ordered = [self.inflight[i].draw for i in sorted(self.inflight)]
        return {"sampler": self.sampler.state(in_flight=ordered), "next_request_id": self.next_id,
                "curriculum": self.curriculum.state(), "skips": self.skips.state(), "balance": self.balance.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`. A state written before curricula, skipping or the balance (no
        ``curriculum``, ``skips`` or ``balance`` key) starts those afresh: every spec at level 0, no skip records,
        empty balance windows (the configured shares)."""
        if not isinstance(state, dict) or not isinstance(state.get("next_request_id"), int):
            raise ValueError("prompt source state: expected a map with sampler and next_request_id")
        self.curriculum.restore(state.get("curriculum", self.curriculum.initial_state()))
        self.skips.restore(state.get("skips", self.skips.initial_state()))
        self.balance.restore(state.get("balance", self.balance.initial_state()))
        self._apply_balance()
        self.sampler.restore(state["sampler"])
        self.inflight.clear()
        self.next_id = state["next_request_id"]


def merge_shard_states(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One unsharded sampler state from the per-generator states of a checkpoint written before the learner owned
    the prompt order (``samplers.json``).

    Shard ``g`` of ``N`` drew positions ``g, g+N, ...`` of each spec's epoch permutation; the unsharded stream draws
    positions ``0, 1, ...`` of the same permutations. Summing the shards' positions per spec covers exactly the
    same problems when every shard drew equally many of that spec. Shards pick specs at random, so their counts
    usually differ a little: then the problems of the current epoch between the shortest and the longest shard's
    reach are partly drawn again and partly skipped once (measured: 2-9 per spec after 300 draws per shard). The
    re-queued draws (unfinished prompts) are kept as they are."""
    states = list(states)
    if not states:
        raise ValueError("no sampler states to merge")
    first = states[0]
    sizes = first.get("sizes")
    if any(s.get("sizes") != sizes or s.get("seed") != first.get("seed") for s in states):
        raise ValueError("sampler states of different runs cannot be merged")
    positions = [sum(int(s["positions"][i]) for s in states) for i in range(len(sizes))]
    return {
        "state_version": STATE_VERSION, "seed": first["seed"], "shard": 0, "num_shards": 1, "sizes": list(sizes),
        "draws": sum(int(s["draws"]) for s in states), "positions": positions,
        "requeued": [d for s in states for d in s.get("requeued", [])],
    }
