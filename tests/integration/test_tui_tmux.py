"""The real TUI in a real terminal: ``python -m prorl_async.monitor.tui --replay`` inside tmux, read with capture-pane.

The replay writes a recorded run's lines into a fresh run directory (each line in two writes) while the TUI
follows it, exactly as during ``prorl-async run``. Every tmux command goes to a server on a socket of this
test's own (``-L``), and the test kills only the session it named.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "unit" / "test_tui_sample.jsonl"
CONFIG_TOML = """\
[run]
max_steps = 3
[model]
name = "tiny-random"
[generator]
num_generators = 2
[learner]
batch_groups = 4
[buffer]
max_staleness = 1
"""


class Tmux:
    """One detached session on a private tmux server; commands address it by its unique name."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: this test drives the TUI in a real terminal (apt-get install -y tmux)")
        self.socket = f"prorl-tui-test-{os.getpid()}"
        self.name = f"tui-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def start(self, command: str, width: int = 120, height: int = 50) -> None:
        # rich trusts COLUMNS / LINES over the terminal (pytest's may be set): the pane's size must win
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), "-c", str(REPO),
                  f"env -u COLUMNS -u LINES {command}")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def wait_for(self, text: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear within {timeout_s} s; the pane shows:\n{screen}")
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-session", "-t", self.name], capture_output=True, timeout=10)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    session = Tmux(tmp_path)
    try:
        yield session
    finally:
        session.kill()


def _line_with(screen: str, *parts: str) -> str:
    for line in screen.splitlines():
        if all(p in line for p in parts):
            return line
    raise AssertionError(f"no line with {parts!r} on the screen:\n{screen}")


def test_replay_in_a_terminal_shows_what_a_person_needs(tmux: Tmux, tmp_path: Path) -> None:
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    shutil.copyfile(SAMPLE, recorded / "metrics.jsonl")
    (recorded / "config.toml").write_text(CONFIG_TOML)
    tmux.start(f"{sys.executable} -m prorl_async.monitor.tui --replay {recorded / 'metrics.jsonl'} --interval-s 0.05 "
               f"--hold; echo TUI-EXITED $?; sleep 60")

    screen = tmux.wait_for("pass@4 0.688")  # the validation record is the last one of the file
    _line_with(screen, "replay: recorded/metrics.jsonl", "model tiny-random", "elapsed 0:01:13", "step 3/3",
               "learner v3")
    # tokens/s over the reports: generator-0 sent 1024 tokens in 10.9 s, generator-1 1536
    assert _line_with(screen, "generator-0", "finished").split()[:7] == \
        ["generator-0", "finished", "n/a", "0", "94.2", "v3", "16"]
    assert _line_with(screen, "generator-1", "running").split()[:9] == \
        ["generator-1", "running", "n/a", "0", "141.3", "v2", "16", "0", "3"]
    assert "-0.0321" in _line_with(screen, "loss ", "staleness", "math")  # the three panels side by side
    assert _line_with(screen, "bound ", "tokens/s").split("bound")[1].split()[0] == "1"  # from config.toml
    assert "4.56e-03" in _line_with(screen, "KL ", "share 0.310")
    assert "1.6789" in _line_with(screen, "entropy")
    assert "3.00 MiB" in _line_with(screen, "weight sync", "0.123 s")
    _line_with(screen, "ref resets", "1 (v3 kl_share)")
    assert max(len(line) for line in screen.splitlines()) <= 120

    tmux.tmux("send-keys", "-t", tmux.name, "C-c")
    screen = tmux.wait_for("TUI-EXITED", timeout_s=10)
    assert "TUI-EXITED 0" in screen and "Traceback" not in screen
    assert "step 3/3" in screen  # the last frame stays on the terminal (no alternate screen)


def test_replay_without_a_terminal_prints_plain_lines(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "prorl_async.monitor.tui", "--replay", str(SAMPLE), "--plain",
                           "--interval-s", "0.02"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "\x1b" not in done.stdout  # no escape sequences in a log
    assert lines[-1].startswith("replay done: 24 records")
    assert "step 3/3" not in lines[-2] and "step 3 " in lines[-2]  # no config beside the sample: no step limit
    assert "loss -0.0321" in lines[-2] and "pass@1 0.438" in lines[-2]


def test_ctrl_c_ends_a_replay_midway_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "prorl_async.monitor.tui", "--replay", str(SAMPLE), "--plain",
                             "--interval-s", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        first = proc.stdout.readline() if ready else ""
        # up, records flowing: the first plain line is the start-up phase the sample's records reach, or a step
        assert "step" in first or "start-up" in first, f"no plain line from the replay within 30 s: {first!r}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"replay stopped after \d+ of 24 records", out), out
