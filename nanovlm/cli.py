"""The `nanovlm` command. Each subcommand lives in `nanovlm/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used, so
`nanovlm validate` does not pay for importing Ray or MLflow.

Errors end here, as one line on stderr: bad input (the project's error types, files, images,
JSON; each message names the file or field and the fix) exits 2; anything else prints one line
with the path of a log file holding the traceback (`$NANOVLM_HOME/logs/`) and exits 1.
`nanovlm --debug ...` (or NANOVLM_DEBUG=1) prints the traceback inline as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from nanovlm.config import ConfigError

SUBCOMMANDS = {
    "train": "train a model, tracked in MLflow (one process, or Ray Train with --num-workers N or --gpu)",
    "generate": "answer a prompt about an image with a checkpoint",
    "eval": "score a checkpoint on benchmarks (MMStar, ScienceQA, AI2D, TextVQA, ChartQA, DocVQA) as lmms-eval does",
    "export": "write a checkpoint for other tools: transformers (Idefics3) or a self-contained nanovlm directory",
    "push": "upload a checkpoint (or its transformers export) to the Hugging Face Hub",
    "config": "print a preset's full config, with overrides applied",
    "validate": "check a config and print parameter counts and FLOPs without building weights",
    "sweep": "run a Ray Tune sweep described by a YAML file",
    "bench": "run a benchmark: compare with transformers, the GPU check, or a benchmark grid",
    "dashboard": "start the MLflow UI on 127.0.0.1 over the default store",
    "tracking": "send to MLflow what a run's journal holds after the store was unreachable (sync DIR)",
}
# Bad input a person can fix (exit status 2), by qualified class name so that checking an error
# imports nothing; subclasses count too. Messages name the file or field and what would be valid.
USER_ERRORS = frozenset({
    "nanovlm.config.ConfigError",
    "nanovlm.models.checkpoint.CheckpointError",
    "nanovlm.tracking.TrackingError",
    "nanovlm.distributed.launcher.ClusterResourceError",
    "nanovlm.training.loop.NonFiniteLossError",
    "nanovlm.data.local_files.DatasetError",
    "PIL.UnidentifiedImageError",
    "json.decoder.JSONDecodeError",
})
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovlm", description="Train, sweep and benchmark small VLMs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback too (also NANOVLM_DEBUG=1)")
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
    try:
        return int(importlib.import_module(f"nanovlm.commands.{args.command}").run(args) or 0)
    except KeyboardInterrupt:
        print(f"nanovlm {args.command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place an error becomes what a person sees
        return report_error(exc, args.command, debug=args.debug or os.environ.get("NANOVLM_DEBUG") == "1",
                            argv=sys.argv[1:] if argv is None else argv)


def report_error(exc: Exception, command: str, *, debug: bool = False, argv: list[str] = ()) -> int:
    """Print `exc` as one line on stderr and return the exit status: 2 for bad input, 1 for
    anything else (its traceback is written to a log file, whose path the line gives)."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if is_user_error(exc):
        kind = "configuration error: " if isinstance(exc, ConfigError) else ""
        print(f"nanovlm {command}: {kind}{one_line(str(exc))}", file=sys.stderr)
        return 2
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    message = f"nanovlm {command}: unexpected error: {type(exc).__name__}: {first[:300]}"
    if not debug:
        log = write_error_log(exc, command, argv)
        if log is None:  # nowhere to write it: show it here
            traceback.print_exception(exc, file=sys.stderr)
        else:
            message += f" (traceback in {log}; --debug prints it here)"
    print(message, file=sys.stderr)
    return 1


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, FILE_ERRORS) or (isinstance(exc, OSError) and exc.filename):
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(exc).__mro__)


def one_line(text: str) -> str:
    """A (possibly multi-line) message on one line: its lines, stripped, joined by spaces."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def write_error_log(exc: BaseException, command: str, argv: list[str]) -> Path | None:
    """`$NANOVLM_HOME/logs/nanovlm-<command>-<time>-<pid>.log` (in the temp dir if that is not
    writable) with the command line and the traceback; None if neither can be written."""
    from nanovlm.tracking import nanovlm_home

    text = (f"nanovlm {' '.join(argv)}\nnanovlm-ray {package_version()}, python {sys.version.split()[0]}\n\n"
            + "".join(traceback.format_exception(exc)))
    name = f"nanovlm-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for directory in (nanovlm_home() / "logs", Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text)
            return directory / name
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
