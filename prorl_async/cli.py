"""The ``prorl-async`` command line: ``run``, ``eval``, ``models``, ``config``.

Start-up stays instant: this module imports only the standard library; torch, vllm, transformers and
pydantic are imported inside the subcommand that needs them. A new knob is a config field reached with
``--set section.key=value``, never a new flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prorl-async",
        description="Asynchronous streaming RL trainer for LLM reasoning (the ProRL recipe).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="train (no CONFIG: the embedded default on CPU)")
    run.add_argument("config", nargs="?", help="TOML config file (default: configs/default.toml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")

    ev = sub.add_parser("eval", help="pass@k and pass@1 distributions of a model or checkpoint")
    ev.add_argument("model", help="built-in model name, Hugging Face directory or checkpoint")
    ev.add_argument("--config", help="TOML config file for tasks and sampling (default: the embedded one)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    cfg = sub.add_parser("config", help="validate a config and print it fully resolved")
    cfg.add_argument("config", nargs="?", help="TOML config file (default: configs/default.toml)")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    models = sub.add_parser("models", help="list the built-in models, or prepare one")
    models.add_argument("prepare", nargs="?", metavar="NAME",
                        help="build/convert NAME into the cache and print its path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "eval":
            return _cmd_eval(args)
    except KeyboardInterrupt:
        print("prorl-async: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user-facing errors are one line; others keep their traceback
        from prorl_async.errors import UserError

        if isinstance(err, UserError):
            print(f"prorl-async: {err}", file=sys.stderr)
            return 2
        raise
    return 2


def _cmd_config(args: argparse.Namespace) -> int:
    from prorl_async.config import config_to_toml, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(config_to_toml(cfg))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from prorl_async import models

    if args.prepare is None:
        for name, summary in models.BUILTIN_MODELS.items():
            print(f"{name:24s} {summary}")
        return 0
    print(models.resolve_model(args.prepare))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from prorl_async.config import load_config
    from prorl_async.errors import UserError
    from prorl_async.orchestrator import resume_config, run

    if args.resume is not None:
        if args.config is not None:
            raise UserError("--resume continues a run with its own RUN_DIR/config.toml: give no CONFIG "
                            "(change values with --set)")
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    return run(cfg, resume=args.resume)


def _cmd_eval(args: argparse.Namespace) -> int:
    from prorl_async.config import load_config
    from prorl_async.errors import UserError

    load_config(args.config, args.overrides)
    raise UserError("eval is not yet available (issue: evaluation, pass@k); `prorl-async run` trains")


if __name__ == "__main__":
    sys.exit(main())
