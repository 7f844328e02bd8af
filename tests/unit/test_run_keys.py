"""A run's CURVE keys held in memory (``CurveKeys``): handed over in the environment, admitted by ZAP, never
printed. Real ZeroMQ sockets on loopback, in this process."""

from __future__ import annotations

import time

import pytest
import zmq

from prorl_async.config import TransportConfig
from prorl_async.transport.sockets import CURVE_KEYS_ENV, CurveKeys, Transport, TransportError, bound_endpoint, run_keys


def test_keys_travel_through_the_environment_and_never_show_the_secret() -> None:
    learner, generator = run_keys()
    assert CurveKeys.from_env(learner.to_env()) == learner
    assert CurveKeys.from_env(generator.to_env()) == generator
    assert learner.authorized == (generator.public,) and generator.server_public == learner.public
    for keys in (learner, generator):
        assert keys.secret.decode() not in repr(keys) and keys.secret.decode() not in str(keys)


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"public": "short", "secret": "short"}'])
def test_a_malformed_key_variable_is_a_clear_error(text: str) -> None:
    with pytest.raises(TransportError, match=CURVE_KEYS_ENV):
        CurveKeys.from_env(text)


def test_the_learner_admits_the_runs_generators_only(monkeypatch: pytest.MonkeyPatch) -> None:
    learner_keys, generator_keys = run_keys()
    _, other_runs_generator = run_keys()
    cfg = TransportConfig(linger_ms=0)
    monkeypatch.setenv(CURVE_KEYS_ENV, learner_keys.to_env())  # as a launcher hands them over
    server = Transport(cfg)
    monkeypatch.delenv(CURVE_KEYS_ENV)
    pull = server.socket(zmq.PULL, "tcp://127.0.0.1:*", bind=True)
    endpoint = bound_endpoint(pull)
    clients = {"run": Transport(cfg, keys=generator_keys), "other run": Transport(cfg, keys=other_runs_generator),
               "no keys": Transport(cfg)}
    try:
        pushes = {name: t.socket(zmq.PUSH, endpoint, bind=False) for name, t in clients.items()}
        time.sleep(1.0)  # handshakes (and refusals) complete
        sent = []
        for name, push in pushes.items():
            try:
                push.send(name.encode(), flags=zmq.NOBLOCK)  # IMMEDIATE: only a completed connection takes it
                sent.append(name)
            except zmq.Again:
                pass
        received = []
        while pull.poll(500):
            received.append(pull.recv().decode())
        assert sent == ["run"] and received == ["run"]
    finally:
        for t in clients.values():
            t.close()
        server.close()
