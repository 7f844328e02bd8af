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

    ev = sub.add_parser(
        "eval", help="pass@k and pass@1 distributions of a model or checkpoint",
        description="Sample held-out prompts with vLLM, score them with the reward functions and report pass@k, "
                    "the pass@1 distribution and the Dang et al. bound per task and domain (eval.json, report.md, "
                    "PNGs). The flags below are shortcuts for eval.* config fields.")
    ev.add_argument("model", help="built-in model name, Hugging Face directory, checkpoint (RUN/checkpoints/step-N) "
                                  "or run directory (its latest checkpoint)")
    ev.add_argument("--config", help="TOML config file for tasks and sampling (default: the run's config.toml for "
                                     "a checkpoint, else the embedded one)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ev.add_argument("--tasks", action="append", metavar="TASK[,TASK]",
                    help="eval.tasks: name, domain/name or domain of tasks.mix entries (default: all of them)")
    ev.add_argument("--k", metavar="K[,K]", help="eval.k: pass@k values, e.g. 1,16,128")
    ev.add_argument("--samples", type=int, metavar="N", help="eval.samples: samples per prompt (default: "
                                                              "eval.samples, raised to the largest k)")
    ev.add_argument("--prompts", type=int, metavar="N", help="eval.prompts: held-out prompts per task (0: all)")
    ev.add_argument("--compare", metavar="OTHER", help="a second model evaluated on the same prompts, side by side")
    ev.add_argument("--out", metavar="DIR", help="output directory (default: eval.out_dir)")

    cfg = sub.add_parser("config", help="validate a config and print it fully resolved")
    cfg.add_argument("config", nargs="?", help="TOML config file (default: configs/default.toml)")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    data = sub.add_parser(
        "data", help="check a config's data and rewards before training: prompts as the model sees them, row counts, "
                     "reference answers scored",
        description="Open every data source and reward function of the config, print the training and validation "
                    "problems per task, render prompts exactly as the model will see them, and score reference "
                    "answers through the run's reward (they should score 1). Exit 0: ready; 1: some reference "
                    "scored below 1; 2: a source or reward function cannot be used.")
    data.add_argument("config", nargs="?", help="TOML config file (default: configs/default.toml)")
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    data.add_argument("--show", type=int, default=3, metavar="N", help="prompts to render (default 3)")
    data.add_argument("--rows", type=int, default=32, metavar="N",
                      help="training problems per task whose reference answers are scored (default 32)")

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
        if args.command == "data":
            return _cmd_data(args)
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


def _cmd_data(args: argparse.Namespace) -> int:
    from prorl_async.config import load_config
    from prorl_async.envs.preview import preview

    return preview(load_config(args.config, args.overrides), show=args.show, rows=args.rows)


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
    from prorl_async.supervisor.supervisor import resume_config, run

    if args.resume is not None:
        if args.config is not None:
            raise UserError("--resume continues a run with its own RUN_DIR/config.toml: give no CONFIG "
                            "(change values with --set)")
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    return run(cfg, resume=args.resume)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from prorl_async.config import load_config
    from prorl_async.errors import UserError
    from prorl_async.eval.run import find_run_config, run_eval

    overrides = list(args.overrides)  # the shortcut flags come last: they win over --set
    if args.tasks:
        tasks = [t.strip() for item in args.tasks for t in item.split(",") if t.strip()]
        overrides.append(f"eval.tasks={json.dumps(tasks)}")
    if args.prompts is not None:
        overrides.append(f"eval.prompts={args.prompts}")
    config = args.config
    if config is None and (run_config := find_run_config(args.model)) is not None:
        config = str(run_config)
        print(f"eval: tasks and prompt format from the run's config {config}")
    if args.samples is not None:
        overrides.append(f"eval.samples={args.samples}")
    if args.k:
        try:
            ks = [int(k) for k in args.k.split(",") if k.strip()]
        except ValueError:
            raise UserError(f"--k {args.k!r}: expected integers separated by commas, e.g. 1,16,128") from None
        if ks and args.samples is None:  # --k alone: enough samples per prompt for its largest k
            samples = load_config(config, overrides).eval.samples
            if max(ks) > samples:
                overrides.append(f"eval.samples={max(ks)}")
        overrides.append(f"eval.k={json.dumps(ks)}")
    cfg = load_config(config, overrides)
    run_eval(cfg, args.model, compare=args.compare, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
