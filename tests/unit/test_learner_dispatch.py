"""The learner hands out the prompts: ``dispatch_loop`` publishes ``GroupRequest``s within the admission budget and
each generator's share; a restart, a returned request and a checkpoint hand the unanswered prompts out again, and a
group that answers no request in flight never reaches the buffer. Real trio, real buffer and checkpoint files; a fake
learner and a fake control socket, no model, no sockets."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.testing

from prorl_async.config import load_config
from prorl_async.learner.dispatch import prompt_source
from prorl_async.learner.prompts import Draw, PromptSampler
from prorl_async.learner.reset import ResetPolicy
from prorl_async.learner.service import LearnerService
from prorl_async.monitor.metrics import read_metrics
from prorl_async.transport.messages import (
    GroupRequest,
    Limits,
    Ready,
    RequestReturned,
    Sample,
    TrajectoryGroup,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100


class FakeLearner:
    """What the service asks of a learner outside a step: versions, vocabulary, reset policy, checkpoint files."""

    def __init__(self, cfg: Any, version: int = 0) -> None:
        self.policy_version = version
        self.vocab_size = VOCAB
        self.reset_policy = ResetPolicy(cfg.reset)

    def save_checkpoint(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "learner.json").write_text(json.dumps({"policy_version": self.policy_version}))
        return directory


class FakeControl:
    """The control publisher: records what is published and whether it replaced the latest (handshake) message."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, bool]] = []

    def publish(self, msg: Any, latest: bool = True) -> None:
        self.published.append((msg, latest))

    def requests(self, generator: int | None = None) -> list[GroupRequest]:
        return [m for m, _ in self.published
                if isinstance(m, GroupRequest) and generator in (None, m.generator_id)]


def _config(*overrides: str) -> Any:
    # tiny: batch_groups 4, max_staleness 1 -> admission budget (K + 1) x batch = 8 requests in flight
    return load_config(ROOT / "configs" / "tiny.toml", list(overrides))


def _service(tmp_path: Path, cfg: Any, **kwargs: Any) -> LearnerService:
    return LearnerService(cfg, tmp_path, learner=FakeLearner(cfg), **kwargs)


def _stream(cfg: Any, service: LearnerService, n: int) -> list[Draw]:
    """The first ``n`` prompts of the run's order (one stream, seeded by ``run.seed``)."""
    sampler = service.dispatch.prompts.sampler
    s = PromptSampler(cfg.run.seed, 0, 1, sampler.sizes, sampler.weights)
    return [s.next() for _ in range(n)]


def _draw(r: GroupRequest) -> Draw:
    return Draw(r.spec, r.index, r.epoch)


def _group(request: GroupRequest, *, token: int = 5, rewards: tuple[float, ...] = (0.0, 1.0, 0.0, 1.0),
           generator: int | None = None) -> TrajectoryGroup:
    samples = [Sample(np.full(2, token, np.int32), np.full(2, -0.5, np.float32), np.zeros(2, np.int32), "stop", r)
               for r in rewards]
    return TrajectoryGroup(prompt_id=f"logic/chain_sum/{request.index}", task="chain_sum", domain="logic",
                           prompt_token_ids=np.array([1, 2, 3], np.int32), samples=samples,
                           generator_id=request.generator_id if generator is None else generator,
                           seq=request.request_id, min_version=0, max_version=0)


async def _drive(service: LearnerService, control: FakeControl,
                 body: Callable[[trio.MemorySendChannel], Awaitable[None]]) -> None:
    """Run ingestion and dispatch while ``body`` sends messages to the learner; stop when it returns."""
    send, receive = trio.open_memory_channel(64)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            nursery.start_soon(service.dispatch.dispatch_loop, control, lambda: service.learner.policy_version)
            await body(send)
            nursery.cancel_scope.cancel()


async def _deliver(send: trio.MemorySendChannel, *messages: Any) -> None:
    """Send, then wait until ingestion and dispatch have done everything these messages cause."""
    for msg in messages:
        await send.send(msg)
    await trio.testing.wait_all_tasks_blocked()


def test_a_ready_generator_gets_requests_up_to_the_admission_budget(tmp_path: Path) -> None:
    cfg = _config()
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send)
        assert control.published == []  # no generator is live yet: nothing is handed out
        await _deliver(send, Ready("generator-0"))
        requests = control.requests()
        assert len(requests) == 8 == (cfg.buffer.ceiling + 1) * cfg.learner.batch_groups  # the budget, not 16
        assert all(not latest for _, latest in control.published)  # requests never replace the handshake message
        assert [r.request_id for r in requests] == list(range(8)) and {r.generator_id for r in requests} == {0}
        assert [_draw(r) for r in requests] == _stream(cfg, service, 8)  # the run's prompt order
        assert {max(r.min_version, 0) for r in requests} == {0}  # the oldest usable weights: any (0 - K < 0)
        await _deliver(send, _group(requests[0]))  # kept: its slot is held until the learner passes its target
        assert len(control.requests()) == 8 and len(service.buffer.buffer) == 1
        service.learner.policy_version = 1  # the learner trained version 0 and published it
        service.dispatch.publish_weights(control, 1)
        await trio.testing.wait_all_tasks_blocked()
        more = control.requests()[8:]
        # target 0's four slots are free again; the new requests may use weights of version 1 - K
        assert len(more) == 4 and [r.request_id for r in more] == list(range(8, 12))
        assert {r.min_version for r in more} == {1 - cfg.buffer.ceiling}

    trio.run(_drive, service, control, body)
    assert service.intake.outcomes == {"admitted": 1}
    assert service.dispatch.prompts.held(0) == 11


def test_each_generator_gets_at_most_its_share_and_a_dropped_group_frees_its_slot(tmp_path: Path) -> None:
    # per generator 2 x max_inflight_groups = 4 requests; the filter drops groups whose rewards do not vary
    cfg = _config("generator.num_generators=2", "generator.max_inflight_groups=2", "buffer.variance_filter=true")
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-1"))
        assert [r.request_id for r in control.requests(1)] == [0, 1, 2, 3] and control.requests(0) == []
        await _deliver(send, Ready("generator-0"))
        assert [r.request_id for r in control.requests(0)] == [4, 5, 6, 7]  # the budget of 8 is used up
        await _deliver(send, _group(control.requests(1)[0]))  # admitted: generator 1 holds 3, no slot is free
        assert len(control.requests()) == 8
        await _deliver(send, _group(control.requests(0)[1], rewards=(1.0,) * 4))  # dropped: its slot is free
        [again] = control.requests()[8:]  # one request, to whichever generator's turn it is (both hold 3)
        assert again.request_id == 8 and _draw(again) == _stream(cfg, service, 9)[8]
        await _deliver(send, _group(control.requests(1)[1], token=VOCAB))  # untrainable: dropped too
        [third] = control.requests()[9:]
        assert third.request_id == 9 and _draw(third) == _stream(cfg, service, 10)[9]

    trio.run(_drive, service, control, body)
    assert service.intake.outcomes == {"admitted": 1, "all_correct": 1, "untrainable": 1}
    prompts = service.dispatch.prompts
    assert prompts.held(0) + prompts.held(1) == 7 and prompts.admission.counted(0) == 8


def test_a_restarted_generator_gets_its_prompts_again_and_late_groups_are_dropped(tmp_path: Path) -> None:
    cfg = _config("generator.max_inflight_groups=2")  # 4 requests per generator
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-0"))
        before = control.requests()
        assert [r.request_id for r in before] == [0, 1, 2, 3]
        await _deliver(send, _group(before[0]))  # answered (kept): generator 0 holds 3, gets a 4th
        [fourth] = control.requests()[4:]
        assert fourth.request_id == 4 and _draw(fourth) == _stream(cfg, service, 5)[4]
        await _deliver(send, Ready("generator-0"))  # a new process: requests 1 to 4 will never be answered
        after = control.requests()[5:]
        # the orphaned prompts again, in order, under new ids
        assert [_draw(r) for r in after] == [_draw(r) for r in (*before[1:], fourth)]
        assert [r.request_id for r in after] == [5, 6, 7, 8] and {r.generator_id for r in after} == {0}
        held = len(service.buffer.buffer)
        await _deliver(send, _group(before[1]))  # the old process's late group: its prompt is requested again
        await _deliver(send, _group(before[0]))  # and a group answered twice
        assert len(service.buffer.buffer) == held and service.intake.outcomes["unrequested"] == 2
        inflight = service.dispatch.prompts.inflight
        assert sorted(inflight) == [5, 6, 7, 8] and len(control.requests()) == 9  # nothing changed
        await _deliver(send, _group(after[0]))  # the current request's group is kept
        assert len(service.buffer.buffer) == held + 1 and 5 not in service.dispatch.prompts.inflight

    trio.run(_drive, service, control, body)
    service.metrics.close()
    ready = [e for e in read_metrics(tmp_path / "metrics.jsonl", kind="event") if e["event"] == "generator_ready"]
    assert [e["requests_reissued"] for e in ready] == [0, 4]
    assert service.dispatch.prompts.counts["orphaned"] == 4 and service.intake.arrived == 2


def test_a_returned_request_is_handed_out_again_and_a_too_long_one_is_not(tmp_path: Path) -> None:
    cfg = _config("generator.num_generators=2", "generator.max_inflight_groups=2")
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-0"), Ready("generator-1"))
        first = control.requests()
        assert len(first) == 8
        stale = control.requests(0)[2]
        await _deliver(send, RequestReturned("generator-0", 0, stale.request_id, "stale"))
        [again] = control.requests()[8:]
        assert _draw(again) == _draw(stale) and again.request_id == 8 and again.generator_id == 0
        too_long = control.requests(1)[0]
        await _deliver(send, RequestReturned("generator-1", 1, too_long.request_id, "too_long"))
        [other] = control.requests()[9:]
        assert other.generator_id == 1 and _draw(other) == _stream(cfg, service, 9)[8]  # a new prompt instead
        # a return that is not for a request in flight (another generator's, or answered already) changes nothing
        await _deliver(send, RequestReturned("generator-1", 1, control.requests(0)[0].request_id, "stale"),
                       RequestReturned("generator-0", 0, stale.request_id, "stale"))
        assert len(control.requests()) == 10

    trio.run(_drive, service, control, body)
    assert service.intake.outcomes == {"unrequested_return": 2}
    counts = service.dispatch.prompts.counts
    assert counts["returned_stale"] == 1 and counts["returned_too_long"] == 1


def test_a_checkpoint_with_requests_in_flight_hands_exactly_those_out_first_on_resume(tmp_path: Path) -> None:
    cfg = _config()
    service, control = _service(tmp_path / "first", cfg), FakeControl()
    saved: dict[str, Any] = {}

    async def first(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-0"))
        requests = control.requests()
        await _deliver(send, _group(requests[0]), _group(requests[3]))  # two answered, six in flight
        saved["path"] = await service.checkpoint()
        saved["open"] = [requests[i] for i in (1, 2, 4, 5, 6, 7)]

    trio.run(_drive, service, control, first)
    path = saved["path"]
    assert (path / "prompts.json").is_file() and not (path / "samplers.json").exists()

    resumed, control = _service(tmp_path / "resumed", cfg, resume_from=path), FakeControl()
    resumed.restore(path)
    assert resumed.dispatch.prompts.inflight == {} and len(resumed.buffer.buffer) == 2

    async def second(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-0"))
        requests = control.requests()
        assert [_draw(r) for r in requests[:6]] == [_draw(r) for r in saved["open"]]  # exactly those, first
        assert [_draw(r) for r in requests[6:]] == _stream(cfg, resumed, 10)[8:]  # then the order goes on
        assert [r.request_id for r in requests] == list(range(8, 16))  # ids are never reused across a resume
        await _deliver(send, _group(saved["open"][0]))  # a group from before the checkpoint: never trained
        assert resumed.intake.outcomes.get("unrequested") == 1 and len(resumed.buffer.buffer) == 2

    trio.run(_drive, resumed, control, second)


def test_published_requests_pass_the_generators_decoder(tmp_path: Path) -> None:
    """What dispatch publishes must decode on the generator's side (``decode`` refuses negative integers)."""
    cfg = _config()
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-0"))

    trio.run(_drive, service, control, body)
    requests = control.requests()
    assert requests
    for r in requests:
        assert decode(encode(r), Limits.from_config(cfg)) == r


def test_an_unknown_generator_gets_nothing(tmp_path: Path) -> None:
    cfg = _config()
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-1"), Ready("evaluator-0"))  # one generator in this run

    trio.run(_drive, service, control, body)
    service.metrics.close()
    assert control.published == [] and service.dispatch.live == {}
    events = read_metrics(tmp_path / "metrics.jsonl", kind="event")
    assert [e["event"] for e in events] == ["unknown_generator", "unknown_generator"]


def test_the_curriculum_follows_every_arriving_group_and_later_requests_carry_the_level(tmp_path: Path) -> None:
    # tiny trains chain_sum (a reasoning-gym curriculum); with the filter on, the solved groups are dropped: they
    # count all the same, as every requested group that arrives does
    cfg = _config("tasks.curriculum.window_groups=2", "buffer.variance_filter=true")
    service, control = _service(tmp_path, cfg), FakeControl()

    async def body(send: trio.MemorySendChannel) -> None:
        await _deliver(send, Ready("generator-0"))
        first = control.requests()
        assert len(first) == 8 and {r.level for r in first} == {0}
        figures = service.dispatch.admission_figures(0)
        assert figures["curriculum"] == {"logic/chain_sum": {"level": 0, "levels": 8, "pass_rate": None, "groups": 0}}
        assert figures["prompt_skips"] == {} and figures["prompt_skip_rate"] == 0.0  # skipping is off in tiny
        assert figures["task_shares"] == {}  # one task: the balance does nothing
        await _deliver(send, _group(first[0], rewards=(1.0,) * 4))  # dropped: its slot goes to a new request
        await _deliver(send, _group(first[1], rewards=(1.0,) * 4))  # the window is full: level 1
        await _deliver(send, _group(first[2], rewards=(0.0,) * 4))  # requested at level 0: not counted
        more = control.requests()[8:]
        assert [r.level for r in more] == [0, 1, 1]  # each at the level of the moment it was issued
        await _deliver(send, _group(more[0]))  # requested at level 0 too
        curriculum = service.dispatch.admission_figures(0)["curriculum"]["logic/chain_sum"]
        assert curriculum == {"level": 1, "levels": 8, "pass_rate": None, "groups": 0}
        assert all(decode(encode(r), Limits.from_config(cfg)) == r for r in more)

    trio.run(_drive, service, control, body)
    service.metrics.close()
    [event] = [e for e in read_metrics(tmp_path / "metrics.jsonl", kind="event") if e["event"] == "curriculum_level"]
    assert {k: event[k] for k in ("label", "previous", "level", "levels", "pass_rate", "groups")} == {
        "label": "logic/chain_sum", "previous": 0, "level": 1, "levels": 8, "pass_rate": 1.0, "groups": 2}
    assert service.intake.outcomes == {"all_correct": 2, "all_wrong": 1, "admitted": 1}
    assert service.dispatch.prompts.curriculum.ignored == 2


def test_the_task_balance_is_built_from_the_mix_and_shown_in_the_step_record() -> None:
    mix = ('tasks.mix=[{name="chain_sum", weight=3.0, params={min_terms=2, max_terms=2, min_digits=1, max_digits=1}},'
           ' {name="chain_sum", weight=1.0}]')
    cfg = _config(mix, "tasks.train_size=20", "tasks.balance.window_groups=4", "tasks.balance.min_share=0.5")
    source = prompt_source(cfg)
    b = source.balance
    assert b.active and b.base == [3.0, 1.0] and (b.window_groups, b.min_share) == (4, 0.5)
    assert b.labels == ["logic/chain_sum#0", "logic/chain_sum#1"]
    assert b.summary() == {"logic/chain_sum#0": {"share": 0.75, "informative": 0.5, "groups": 0},
                           "logic/chain_sum#1": {"share": 0.25, "informative": 0.5, "groups": 0}}
    off = prompt_source(_config(mix, "tasks.train_size=20", "tasks.balance.enabled=false"))
    assert not off.balance.active and off.balance.summary() == {}
