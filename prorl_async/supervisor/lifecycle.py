"""Child processes end with their supervisor: no orphan keeps a core (or a GPU) after the supervisor is killed.

The supervisor starts each child in a session of its own (so that a terminal's Ctrl-C reaches only the
supervisor, which stops the children in order) and names itself in ``PRORL_SUPERVISOR_PID``. A child calls
:func:`exit_with_parent` once at start: a daemon thread checks every ``interval_s`` that its parent is
still that process, and when it is not (the supervisor died, even by SIGKILL, and the child was re-parented)
it sends SIGTERM to its process group: itself, which the learner and the generators handle as a clean stop (the
learner writes a checkpoint), and the processes it started (vLLM's engine core, the scoring pool), which no
supervisor is left to reap. A child that leads its process group also starts :func:`guard_group`'s small process,
which stops the rest of the group once the child is gone by any death, SIGKILL included (nothing else would: Ray
kills an actor's child processes, not theirs). ``prctl(PR_SET_PDEATHSIG)`` cannot do the watch's job: it fires when
the *thread* that forked the child exits, and trio starts processes from worker threads that come and go.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ENV = "PRORL_SUPERVISOR_PID"

log = logging.getLogger(__name__)


def supervisor_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child of this process: names this process as the supervisor to outlive not."""
    return {**env, ENV: str(os.getpid())}


def exit_with_parent(interval_s: float = 1.0) -> threading.Thread | None:
    """Start the watch when ``PRORL_SUPERVISOR_PID`` names this process's parent; None otherwise."""
    value = os.environ.get(ENV, "")
    if not value.isdigit():
        return None
    supervisor = int(value)
    if os.getppid() != supervisor:  # already gone between fork and here, or started by someone else
        if _gone(supervisor):
            log.error("the supervisor (pid %d) is gone: stopping", supervisor)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(interval_s):
            if os.getppid() != supervisor:
                _stop_my_group(supervisor, stop)
                return

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    if os.getpgrp() == os.getpid():
        guard_group()
    return thread


# The guard: stops the rest of the group when the leader (its parent) is gone. It ignores SIGTERM, so the group's
# SIGTERM passes it by; the final SIGKILL takes it along.
_GUARD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
leader, grace_s = int(sys.argv[1]), float(sys.argv[2])
while os.getppid() == leader:
    time.sleep(0.5)
group = os.getpgrp()
def others():
    for stat in os.listdir("/proc"):
        if stat.isdigit() and int(stat) != os.getpid():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                return True
    return False
try:
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and others():
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)
except (ProcessLookupError, PermissionError):
    pass
"""


def guard_group(grace_s: float = 10.0) -> subprocess.Popen | None:
    """Start a small process that, once this process (the group's leader) is gone, by any death, SIGKILL included,
    stops every process left in its group: SIGTERM, then SIGKILL after ``grace_s``.

    What this process started (vLLM's engine core and workers, the scoring pool) otherwise outlives it when it is
    killed outright (Ray kills an actor's child processes when the actor or its node goes, the OOM killer) and keeps
    its cores, memory and GPU. Linux only (it reads /proc); None elsewhere.
    """
    if not Path("/proc").is_dir():
        return None
    return subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), str(grace_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_my_group(supervisor: int, stop: threading.Event, grace_s: float = 60.0) -> None:
    """SIGTERM to this process (a clean stop: the learner checkpoints) and, when it leads its process group (the
    launchers start each child in a session of its own), to every process it started (vLLM's engine core, the
    scoring pool): nobody else is left to reap them. Whatever of the group still runs after ``grace_s`` is killed."""
    leader = os.getpgrp() == os.getpid()
    log.error("the supervisor (pid %d) is gone: stopping (SIGTERM to %s)", supervisor,
              "my process group" if leader else "myself")
    if not leader:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    os.killpg(os.getpgrp(), signal.SIGTERM)
    if not stop.wait(grace_s):  # still here: this process did not stop on SIGTERM, nor did its group
        os.killpg(os.getpgrp(), signal.SIGKILL)


def process_table() -> dict[int, tuple[str, int, int]]:
    """``{pid: (state, ppid, pgrp)}`` of every process, from /proc (Linux); empty where there is no /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
            table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue  # exited while we read
    return table


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
