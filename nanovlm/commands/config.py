"""`nanovlm config`: print the full config of a preset with overrides, as JSON."""

from __future__ import annotations

import argparse
import json

from nanovlm.commands.common import add_config_arguments, configs_from_args
from nanovlm.config import configs_to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    vlm, train = configs_from_args(args)
    print(json.dumps(configs_to_dict(vlm, train), indent=2))
    return 0
