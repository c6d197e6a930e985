"""`nanovlm bench`: the benchmarks, one subcommand each.

    nanovlm bench compare [--configs tiny,mid] [--json PATH]       # ours vs transformers, CPU
    nanovlm bench gpu-check [--json PATH] [--markdown PATH]        # nanovlm-222m on one GPU
    nanovlm bench grid benchmarks/grids/shuffle.yaml               # every point of a grid, Ray Tune
    nanovlm bench grid benchmarks/grids/batch.yaml --set lm_n_blocks=2 --executor local --no-tracking

Each subcommand's flags are defined here, once; `run` hands the parsed flags to
nanovlm/bench/compare.py, gpu_check.py or grid.py. The flags are plain argparse so that
building the `nanovlm` parser does not import torch (the bench modules do).
"""

from __future__ import annotations

import argparse

BENCHMARKS = {
    "compare": "ours vs transformers' Idefics3, same weights, same process, same run "
               "(exit status 1 when a speed target is not met)",
    "gpu-check": "one-shot GPU benchmark of a preset with random weights, no network "
                 "(exit status 1 when a measurement failed)",
    "grid": "measure every point of a benchmark grid YAML file not already cached, one Ray Tune "
            "trial each unless --executor local (exit status 1 when a point failed)",
}
# nanovlm.bench.compare.CONFIGS and CompareSettings' defaults, written out so that the parser
# does not import torch (a test keeps them equal).
COMPARE_CONFIGS = ("tiny", "mid")
COMPARE_WARMUP, COMPARE_REPEATS, COMPARE_COMPILE = 2, 7, True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, add in (("compare", add_compare_arguments), ("gpu-check", add_gpu_check_arguments),
                      ("grid", add_grid_arguments)):
        add(sub.add_parser(name, help=BENCHMARKS[name], description=BENCHMARKS[name]))


def _config_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARE_CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configs {unknown}; choose from {sorted(COMPARE_CONFIGS)}")
    return names


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="write the results (per config and measure) to this file")
    parser.add_argument("--configs", type=_config_names, default="tiny,mid",
                        help=f"comma separated, from {sorted(COMPARE_CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=COMPARE_REPEATS)
    parser.add_argument("--warmup", type=int, default=COMPARE_WARMUP)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores the 1-minute load average leaves free, at "
                             "least 1: on a shared machine, OpenMP threads that wait for a busy core turn "
                             "every small op into a scheduler delay)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPARE_COMPILE,
                        help="also measure ours compiled against the same eager reference (default; --no-compile "
                             "skips it): training under torch.compile, decoding with generate(compile=True) (on "
                             "CPU the fused C++ decode step, built once per machine in ~25 s); the first steps "
                             "compile (tens of seconds per config)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc's malloc to keep freed memory (what the training loop does on CPU, "
                             "`keep_freed_memory`) for the whole process, so for both sides: without it, each "
                             "side pays the page faults of its own allocation pattern")


def add_gpu_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="nanovlm-222m")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), bfloat16, float32")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (rehearsal, CI)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    parser.add_argument("--markdown", default=None, help="also write the Markdown table here")


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a benchmark grid YAML file, e.g. benchmarks/grids/shuffle.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="fix a VLMConfig/TrainConfig field for every point (wins over the file)")
    parser.add_argument("--output", default=None,
                        help="results and cache directory (default: $NANOVLM_HOME/bench/<name>)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray: one Ray Tune trial per point (default); local: in this process")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "compare":
        from nanovlm.bench import compare
        return compare.run(args)
    if args.benchmark == "gpu-check":
        from nanovlm.bench import gpu_check
        return gpu_check.run(args)
    return run_grid_file(args)


def run_grid_file(args: argparse.Namespace) -> int:
    """Points already measured (same config, settings and torch version) come from the cache in
    the output directory; the table, CSV and plots are rewritten each time."""
    from nanovlm.bench.grid import load_grid, run_grid

    grid = load_grid(args.file, args.overrides)
    result = run_grid(grid, output_dir=args.output, executor=args.executor, tracking=not args.no_tracking)
    print((result.output_dir / "results.md").read_text())
    print(f"{len(result.measured)} point(s) measured, {len(result.cached)} from the cache; "
          f"results in {result.output_dir}")
    if result.parent_run_id:
        print(f"MLflow run {result.parent_run_id} (experiment bench-{grid.name}); open it with `nanovlm dashboard`")
    failed = [r for r in result.rows if r.get("status") == "failed"]
    return 1 if failed else 0
