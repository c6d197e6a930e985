"""`nanovlm sweep`: run a Ray Tune sweep described by a YAML file (see docs/sweeps.md).

    nanovlm sweep tune/demo.yaml                      # 4 trials, ASHA, results + MLflow runs
    nanovlm sweep tune/demo.yaml --set max_training_steps=100 --num-samples 2
    nanovlm sweep tune/demo.yaml --resume             # continue the latest `demo` sweep
    nanovlm sweep --resume ~/.nanovlm/sweeps/demo-20260101-120000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from nanovlm.config import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("space", nargs="?", default=None, help="a search-space YAML file, e.g. tune/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="fix a VLMConfig/TrainConfig field for every trial (wins over the file's overrides)")
    parser.add_argument("--num-samples", type=int, default=None, help="replace the file's num_samples")
    parser.add_argument("--name", default=None, help="replace the file's sweep name")
    parser.add_argument("--storage-path", default=None,
                        help="where sweep directories go: a path, or a URI such as s3://bucket/sweeps for a "
                             "multi-node cluster (default: $NANOVLM_HOME/sweeps, ~/.nanovlm/sweeps)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                        help="resume an interrupted sweep: its directory, or (no value) the latest sweep "
                             "of this space's name; finished trials are not run again")
    parser.add_argument("--address", default=None,
                        help="Ray cluster (GCS host:port): 'local' starts a private one on 127.0.0.1 for this sweep; "
                             "default: RAY_ADDRESS, else the cluster the last `ray start` recorded, else a private "
                             "one. An address that does not answer within 20 s is an error")


def run(args: argparse.Namespace) -> int:
    from nanovlm.sweep.results import why_no_trial_trained
    from nanovlm.sweep.runner import default_storage, find_resumable, run_sweep
    from nanovlm.sweep.space import check_some_trial_is_valid, load_space

    resume_dir = None
    spec = None
    if args.space:
        spec = load_space(args.space, args.overrides)
        if args.num_samples is not None:
            if args.num_samples <= 0:
                raise ConfigError(f"--num-samples {args.num_samples} must be positive.")
            spec.num_samples = args.num_samples
        if args.name:
            spec.name = args.name
    if args.resume:
        if args.resume != "latest":
            resume_dir = args.resume  # a path or a URI (s3://...)
        elif spec is None:
            raise ConfigError("--resume without a directory needs the space file, e.g. "
                              "`nanovlm sweep tune/demo.yaml --resume`.")
        else:
            resume_dir = find_resumable(spec.name, args.storage_path or spec.storage_path or default_storage())
    elif spec is None:
        raise ConfigError("Give a search-space file (e.g. `nanovlm sweep tune/demo.yaml`) or --resume DIR.")
    else:
        check_some_trial_is_valid(spec)  # before Ray starts

    outcome = run_sweep(spec, resume_dir=resume_dir, storage_path=args.storage_path, ray_address=args.address)
    print_outcome(outcome)
    failure = why_no_trial_trained(outcome.records)
    if failure is not None and outcome.records and all(r.status == "invalid" for r in outcome.records):
        raise ConfigError(f"Sweep {outcome.sweep_dir}: {failure}. Change the space or the fixed overrides.")
    if failure is not None:
        print(f"nanovlm sweep: {failure} (results in {outcome.files['results.md']})", file=sys.stderr)
        return 1
    if outcome.tracking_pending:
        from nanovlm.tracking import masked_uri

        print(f"nanovlm sweep: the MLflow store {masked_uri(outcome.tracking_uri)} did not take everything; "
              f"{len(outcome.tracking_pending)} run journal(s) hold the rest. When the store answers, send it with: "
              f"nanovlm tracking sync {outcome.local_dir or outcome.sweep_dir}", file=sys.stderr)
        return 3
    return 1 if outcome.interrupted else 0


def print_outcome(outcome) -> None:
    """What a person sees at the end: the table, the best trial's per-question accuracy, where
    everything is, and how to look at it."""
    from nanovlm.tracking import masked_uri

    files = outcome.files
    print()
    print(files["results.md"].read_text())
    best = outcome.best
    if best is None:
        print("No trial produced a value of the metric; see the reasons above.")
    else:
        print(f"Best trial {best.trial_id}: " + ", ".join(f"{k}={v}" for k, v in best.config.items()))
        accuracies = {k[len("val_accuracy_"):]: v for k, v in _final_metrics(best).items()
                      if k.startswith("val_accuracy_")}
        if accuracies:
            chance = _chance(outcome, best)
            print("  per-question accuracy on the validation split (chance = majority answer):")
            for qtype, value in sorted(accuracies.items()):
                base = chance.get(qtype)
                print(f"    {qtype:<10} {value:6.1%}" + (f"   (chance {base:.1%})" if base is not None else ""))
        overall = best.final("val_accuracy")
        if overall is not None:
            print(f"  overall accuracy {overall:.1%}, val_loss {best.final('val_loss')}")
    print()
    print(f"Sweep directory:  {outcome.sweep_dir}")
    print(f"Results:          {files['results.md']}  (and results.csv)")
    if "config.json" in files:
        print(f"Best config:      {files['config.json']}")
        print(f"  retrain it:     nanovlm train --config {files['config.json']}")
    print(f"Plots:            {files['metric_vs_fields.png']}, {files['learning_curves.png'].name}")
    print(f"MLflow:           parent run {outcome.parent_run_id} in {masked_uri(outcome.tracking_uri)}")
    print("Dashboard:        nanovlm dashboard   (then open http://127.0.0.1:5000)")
    if outcome.interrupted:
        print(f"Some trials did not finish (interrupt or time budget). Resume with: "
              f"nanovlm sweep --resume {outcome.sweep_dir}")


def _final_metrics(record) -> dict[str, float]:
    keys = {k for result in record.history for k in result}
    return {k: v for k in keys if (v := record.final(k)) is not None}


def _chance(outcome, record) -> dict[str, float]:
    from nanovlm import storage
    from nanovlm.distributed.launcher import SUMMARY_FILE

    # rank 0 of the trial wrote it through the storage (it may have run on another node)
    summary = storage.read_json(storage.join(outcome.sweep_dir, "train", record.trial_id, SUMMARY_FILE)) or {}
    if summary.get("chance"):
        return summary["chance"]
    try:
        from nanovlm.data.shapes import chance_per_type

        config = json.loads(outcome.files["config.json"].read_text())["train"]
        return chance_per_type(config["shapes_max_objects"], config["shapes_question_types"])
    except Exception:  # noqa: BLE001 - chance is a nicety of the printout
        return {}
