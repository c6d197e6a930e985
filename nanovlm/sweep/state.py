"""A sweep's directory and its state file, on a local or shared path or an object store.

    <storage>/<name>-<date>-<time>/      a path, or a URI (s3://bucket/sweeps/...): `nanovlm.storage`
        nanovlm_sweep.json               the space, the parent run, each trial's run id and status
        tune/                            Tune's experiment (Tune reads and writes it through the URI)
        train/<trial_id>/                each trial's Ray Train run: checkpoints, summary
        results/                         table, best config, plots (written locally, then copied)

Files that only one process on one node uses live in the sweep's *local directory*: the sweep
directory itself when it is a path, else `$NANOVLM_HOME/sweeps/<name>-<date>-<time>` on each node:
trials' output_dirs (`trials/<trial_id>/`: the loop's checkpoints before Ray copies them, rank 0's
MLflow journal), the parent run's journal and the results before they are copied.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from nanovlm import storage, tracking
from nanovlm.sweep.space import SweepSpec, parse_space

STATE_FILE = "nanovlm_sweep.json"


def default_storage() -> Path:
    return tracking.nanovlm_home() / "sweeps"


def as_location(location: str | Path) -> str | Path:
    """A sweep directory as the code passes it around: a `Path` on a filesystem, the URI string
    on an object store."""
    resolved = storage.resolve(location)
    return resolved if storage.is_uri(resolved) else Path(resolved)


def local_dir(sweep_dir: str | Path) -> Path:
    """Where this node keeps the sweep's node-local files (module docstring)."""
    if storage.is_uri(sweep_dir):
        return tracking.nanovlm_home() / "sweeps" / storage.basename(sweep_dir)
    return Path(sweep_dir)


class SweepState:
    """`nanovlm_sweep.json`: written by the driver only, read on resume and for the results."""

    def __init__(self, path: str | Path, data: dict[str, Any]):
        self.path = as_location(path)
        self.sweep_dir = as_location(str(self.path).rsplit("/", 1)[0])
        self.local_dir = local_dir(self.sweep_dir)
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def load(cls, sweep_dir: str | Path) -> "SweepState":
        path = storage.join(storage.resolve(sweep_dir), STATE_FILE)
        data = storage.read_json(path)
        if data is None:
            raise FileNotFoundError(f"{sweep_dir} is not a nanovlm sweep directory (no {STATE_FILE}).")
        return cls(path, data)

    def trial(self, trial_id: str) -> dict[str, Any]:
        return self.data.setdefault("trials", {}).setdefault(trial_id, {})

    def save(self) -> None:
        with self._lock:
            storage.write_json(self.path, self.data)

    def spec(self) -> SweepSpec:
        import yaml

        spec = parse_space(yaml.safe_load(self.data["space_text"]), default_name=self.data["spec_name"],
                           where=self.data.get("space_path") or STATE_FILE,
                           extra_overrides=self.data.get("extra_overrides"))
        spec.source_path, spec.source_text = self.data.get("space_path"), self.data["space_text"]
        return spec


def new_sweep_dir(storage_path: str | Path, name: str) -> str | Path:
    """Create `<storage>/<name>-<date>-<time>`, or `...-2`, `-3`, ... when sweeps of that name
    started in the same second. On a filesystem `mkdir` either creates the directory or fails,
    so concurrent sweeps never share one; an object store has no such call, and a name counts
    as taken once anything exists under it."""
    root = as_location(storage_path)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if isinstance(root, Path):
        root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = storage.join(root, stem if n == 1 else f"{stem}-{n}")
        if isinstance(root, Path):
            try:
                Path(candidate).mkdir()
                return Path(candidate)
            except FileExistsError:
                continue
        if not storage.exists(candidate):
            return candidate
    raise AssertionError("unreachable")


def find_resumable(spec_name: str, storage_path: str | Path) -> str | Path:
    """The most recent sweep directory of `spec_name` under `storage_path`."""
    root = storage.resolve(storage_path)
    candidates = [storage.join(root, d) for d in storage.subdirectories(root) if d.startswith(f"{spec_name}-")]
    states = [(storage.modified(storage.join(c, STATE_FILE)), c) for c in candidates
              if storage.exists(storage.join(c, STATE_FILE))]
    if not states:
        raise FileNotFoundError(f"No sweep named {spec_name!r} to resume under {root}; "
                                "run it without --resume first, or pass its directory to --resume.")
    return as_location(max(states)[1])


def trial_output_dir(sweep_dir: str | Path, trial_id: str) -> Path:
    """A trial's output_dir on this node."""
    return local_dir(sweep_dir) / "trials" / trial_id
