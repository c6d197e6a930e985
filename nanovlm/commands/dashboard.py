"""`nanovlm dashboard` (not built yet)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise SystemExit("nanovlm dashboard is not implemented yet")
