"""The `nanovlm` command. Each subcommand lives in `nanovlm/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used, so
`nanovlm validate` does not pay for importing Ray or MLflow."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nanovlm.config import ConfigError

SUBCOMMANDS = {
    "train": "train a model, tracked in MLflow (one process, or Ray Train with --num-workers N or --gpu)",
    "generate": "answer a prompt about an image with a checkpoint",
    "config": "print a preset's full config, with overrides applied",
    "validate": "check a config and print parameter counts and FLOPs without building weights",
    "sweep": "run a Ray Tune sweep described by a YAML file",
    "bench": "run a benchmark: compare with transformers, the GPU check, or a benchmark grid",
    "dashboard": "start the MLflow UI on 127.0.0.1 over the default store",
    "tracking": "send to MLflow what a run's journal holds after the store was unreachable (sync DIR)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovlm", description="Train, sweep and benchmark small VLMs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"nanovlm.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), without importing the package's modules."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanovlm-ray")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # a retry line per failed MLflow request; the tracking journal reports an outage once
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    module = importlib.import_module(f"nanovlm.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"nanovlm {args.command}: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"nanovlm {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
