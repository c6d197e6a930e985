"""One module per `nanovlm` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
