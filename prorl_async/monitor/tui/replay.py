"""``python -m prorl_async.monitor.tui --replay METRICS.jsonl``: a recorded run, shown by the live TUI as it happened.

The replay writes the file's lines into a fresh run directory at a steady pace, each line in two writes (a
reader polling in between sees a torn line), while a :class:`RunView` follows that file and the live screen
(or the plain lines) draws it: the code path of a real run, without one. Handy to look at a finished run and
to test the TUI in a terminal. Ctrl-C / SIGTERM end it at any point; the last frame stays on the terminal. The
headline (policy reward, held-out pass@1) and the start-up phases (lines in ``--plain``) come from the records as
in a live run; a file older than the arrived rewards shows the policy reward as ``n/a``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console

from prorl_async.monitor.tui.app import live_loop, plain_loop
from prorl_async.monitor.tui.view import RunView


async def _stop_on_signal_loop(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            cancel_scope.cancel()  # the loops draw their last frame as they end
            return


async def replay(metrics: Path, run_dir: Path, *, interval_s: float, plain: bool, hold: bool,
                 refresh_per_s: float = 4.0, console: Console | None = None) -> int:
    """Write ``metrics``' lines into ``run_dir/metrics.jsonl`` one every ``interval_s`` while a view follows it.

    Returns the number of lines written; Ctrl-C / SIGTERM ends the replay at any point (``hold``: only then).
    """
    view = RunView(run_dir, title=f"replay: {metrics.parent.name}/{metrics.name}", clock=None)
    lines = metrics.read_bytes().splitlines(keepends=True)
    written = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal_loop, nursery.cancel_scope)
        if plain:
            await nursery.start(lambda task_status: plain_loop(view, every_s=interval_s, task_status=task_status))
        else:
            await nursery.start(lambda task_status: live_loop(view, refresh_per_s=refresh_per_s, console=console,
                                                              task_status=task_status))
        with (run_dir / "metrics.jsonl").open("ab", buffering=0) as out:
            for line in lines:
                half = len(line) // 2
                out.write(line[:half])  # a reader polling now sees a torn line and must wait for the rest
                await trio.sleep(interval_s / 2)
                out.write(line[half:] if line.endswith(b"\n") else line[half:] + b"\n")
                written += 1
                await trio.sleep(interval_s / 2)
        await trio.sleep(2.0 / refresh_per_s)  # let the last lines reach the screen
        if hold:
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prorl_async.monitor.tui",
                                     description="Replay a run's metrics in the TUI.")
    parser.add_argument("--replay", required=True, type=Path, metavar="METRICS.jsonl", help="a recorded metrics file")
    parser.add_argument("--config", type=Path, help="the run's config.toml (default: the one beside METRICS)")
    parser.add_argument("--interval-s", type=float, default=0.1, help="pause between records (default 0.1)")
    parser.add_argument("--plain", action="store_true", help="plain log lines instead of the live screen")
    parser.add_argument("--hold", action="store_true", help="keep the last screen until Ctrl-C")
    args = parser.parse_args(argv)
    if not args.replay.is_file():
        parser.error(f"no such metrics file: {args.replay}")
    config = args.config or args.replay.parent / "config.toml"
    total = len(args.replay.read_bytes().splitlines())
    with tempfile.TemporaryDirectory(prefix="prorl-tui-replay-") as tmp:
        run_dir = Path(tmp)
        if config.is_file():
            shutil.copyfile(config, run_dir / "config.toml")
        started = time.monotonic()
        n = trio.run(lambda: replay(args.replay, run_dir, interval_s=args.interval_s, plain=args.plain,
                                    hold=args.hold))
    if n == total:
        print(f"replay done: {total} records in {time.monotonic() - started:.1f} s", flush=True)
    else:
        print(f"replay stopped after {n} of {total} records", flush=True)
    return 0

