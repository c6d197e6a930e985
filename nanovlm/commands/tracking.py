"""`nanovlm tracking sync DIR`: send to MLflow what a run's journal holds.

    nanovlm tracking sync runs/demo                 # a run's output_dir (or its mlflow_journal/<run id>)
    nanovlm tracking sync ~/.nanovlm/sweeps/demo-20260101-120000   # every trial of a sweep
    nanovlm tracking sync runs/demo --tracking-uri http://127.0.0.1:5000   # the store moved

Training logs each step to a journal in its output_dir (`output_dir/mlflow_journal/<run id>/`,
see `nanovlm.tracking_journal`) and sends it from a background thread. When the store was still
unreachable at the end, `nanovlm train` exited 3 and the journal holds the metrics, the
artifacts to upload and the run's end status; this sends them, once the store answers. Sending
twice is harmless (MLflow ignores a metric it already holds with the same timestamp).

Exit status: 0 everything sent (or nothing to send), 1 some journal could not be sent (the
store is still down, or a live run still writes it): run it again later; 2 no journal in DIR.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sync = sub.add_parser("sync", help="send the journals under DIR to their MLflow store",
                          description="Send the metrics, artifacts and end status that MLflow lacks from every "
                                      "journal under DIR (a run's output_dir, a sweep directory, or one journal).")
    sync.add_argument("dir", metavar="DIR", help="a run's output_dir, a sweep directory or one journal directory")
    sync.add_argument("--tracking-uri", default=None, metavar="URI",
                      help="send to this store instead of the one each journal names (e.g. the server moved)")


def run(args: argparse.Namespace) -> int:
    from nanovlm.tracking_journal import sync

    results = sync(args.dir, uri=args.tracking_uri)
    failed = 0
    for result in results:
        if result.error is not None:
            failed += 1
            print(f"{result.journal}: not sent ({result.error}); {result.sent} still wait(s) there.", file=sys.stderr)
        elif result.sent == "nothing":
            print(f"{result.journal}: MLflow run {result.run_id} already has everything.")
        else:
            print(f"{result.journal}: sent {result.sent} to MLflow run {result.run_id}.")
    if failed:
        print(f"nanovlm tracking sync: {failed} of {len(results)} journals not sent; run it again when the "
              "store answers.", file=sys.stderr)
        return 1
    return 0
