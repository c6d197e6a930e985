"""Arguments shared by the commands that take a config: --preset, --config, --set."""

from __future__ import annotations

import argparse

from nanovlm.config import (PRESETS, ConfigError, TrainConfig, VLMConfig, apply_overrides, configs_from_dict, preset,
                            read_json_file)


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    parser.add_argument("--preset", default=default_preset, help=f"named preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", default=None,
                        help="a JSON file with 'vlm' and 'train' sections (e.g. a sweep's best config.json); "
                             "replaces --preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a VLMConfig/TrainConfig field, e.g. --set lm_n_blocks=4 (repeatable)")


def configs_from_args(args: argparse.Namespace) -> tuple[VLMConfig, TrainConfig]:
    """Preset or config file, then --set overrides; both configs validated."""
    vlm, train = apply_overrides(*base_configs(args), args.overrides)
    return vlm.validate(), train.validate()


def base_configs(args: argparse.Namespace) -> tuple[VLMConfig, TrainConfig]:
    """The --config file's configs, else the --preset's (not validated yet)."""
    if not args.config:
        return preset(args.preset)
    data = read_json_file(args.config, what="--config")
    try:
        return configs_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"--config {args.config}: {exc}") from None
