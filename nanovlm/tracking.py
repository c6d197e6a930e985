"""MLflow tracking: where runs are stored, what each run records, and logging that never kills training.

Default store: a SQLite file `~/.nanovlm/mlflow.db` with artifacts in `~/.nanovlm/mlartifacts`, a
location that outlives a submitted job's temporary working directory. `NANOVLM_HOME` moves the
root; `MLFLOW_TRACKING_URI` replaces the store entirely (an `http://` server on a cluster, another
`sqlite:///` file), also when given to `ray job submit --runtime-env-json`.

One MLflow run per training run: every config field is a param under its dataclass name,
metrics are logged by step, the final checkpoint and `summary.json` are artifacts, and tags say
who ran it from where (MLflow's own `mlflow.user`, `mlflow.source.*`), and which commit, preset,
dataset, world size and device produced it. Each checkpoint holds a run record
(`mlflow_run.json`), so that resuming from it continues the same MLflow run. Experiments are
tagged as model training, so the MLflow UI opens them on their runs. `check_tracking_store`
fails fast with a clear message before training. During training, metrics go through a journal
on disk and a background thread (`nanovlm.tracking_journal`); `TrackingRun` here is the small
fail-soft client of the processes around training (sweep controller, benchmark grids).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
PARENT_RUN_TAG = "mlflow.parentRunId"   # MLflow's own tag for nested runs
# MLflow 3's UI shows an experiment without this tag as GenAI work (traces, "Evaluations");
# its values: genai_development, custom_model_development, finetuning, no_inferred_type.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_RECORD_FILE = "mlflow_run.json"     # in each training checkpoint: the run that wrote it
RESUMED_WITH_TAG = "nanovlm.resumed_with"  # config fields a resumed run changed (params are immutable)
MAX_BUFFERED_METRICS = 50_000           # kept across tracking outages, oldest dropped beyond this


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written; raised only before training starts."""


# ==================================================================== locations

def nanovlm_home() -> Path:
    """Root for state that outlives a job: `$NANOVLM_HOME` or `~/.nanovlm`."""
    return Path(os.environ.get("NANOVLM_HOME") or Path.home() / ".nanovlm").expanduser().resolve()


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI` if set, else `sqlite:///<nanovlm_home>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{nanovlm_home() / DB_FILENAME}"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///` URI (absolute with four slashes, else relative to
    the working directory), None for other stores."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    rest = uri[len("sqlite:///"):]
    return Path(rest) if rest.startswith("/") else Path(rest).resolve()


def absolute_uri(uri: str) -> str:
    """A relative `sqlite:///x.db` made absolute, so that processes with another working
    directory (Ray workers) open the same file; other URIs unchanged."""
    db = sqlite_path(uri)
    return f"sqlite:///{db}" if db is not None else uri


def artifact_root(uri: str) -> Optional[str]:
    """Artifact location for new experiments: next to a SQLite db (so it is as stable as the db);
    None for servers, which choose their own (`--artifacts-destination`)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / ARTIFACTS_DIRNAME).resolve().as_uri()


SECRET_QUERY_VALUE = r"([?&][^&=#]*(?:pass|token|secret|key|auth|signature)[^&=#]*=)[^&#]*"  # case-insensitive


def masked_uri(uri: Optional[str]) -> Optional[str]:
    """`uri` as it may be printed or logged: a password in it becomes `***` (a user name alone,
    which may be a token, too), and so do query values whose names look secret.
    `http://me:pw@host:5000` -> `http://me:***@host:5000`; `sqlite:///x.db` unchanged."""
    import re

    if not uri or "://" not in uri:
        return uri
    netloc = urllib.parse.urlsplit(uri).netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        uri = uri.replace(netloc, f"{user}:***@{host}" if sep else f"***@{host}", 1)
    return re.sub(SECRET_QUERY_VALUE, r"\1***", uri, flags=re.IGNORECASE)


# ==================================================================== reachability

def check_tracking_store(uri: Optional[str] = None, timeout_s: float = 10.0) -> str:
    """Raise `TrackingError` naming the URI and the fix if the store cannot be used; return the URI.

    http(s) servers get one plain HTTP request with a timeout (MLflow's own client retries for
    minutes); SQLite files need a writable directory; then one real query proves the store works.
    """
    uri = uri or default_tracking_uri()
    fix = ("Start the server, fix the URI, or unset MLFLOW_TRACKING_URI to use the default "
           f"SQLite store under {nanovlm_home()}.")
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # the server answered; /health may just not exist there
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {masked_uri(uri)} is unreachable ({reason}). {fix}") from None
    elif scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise TrackingError(
            f"MLflow tracking URI {masked_uri(uri)} is a file store, which MLflow {_mlflow_version()} refuses "
            "(maintenance mode). Use a SQLite file, e.g. MLFLOW_TRACKING_URI=sqlite:////abs/path/mlflow.db.")
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"Cannot create the directory of the MLflow SQLite store {db}: {exc}. {fix}") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"The MLflow SQLite store directory {db.parent} is not writable. {fix}")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(f"MLflow tracking store {masked_uri(uri)} does not answer: {type(exc).__name__}: {exc}. {fix}") from None
    return uri


def _mlflow_version() -> str:
    from importlib.metadata import version  # without importing mlflow (seconds)
    return version("mlflow")


_OPENED_SQLITE: set[str] = set()   # SQLite URIs this process has opened (MLflow caches the store)


def _client(uri: str):
    # Servers: fail within seconds instead of MLflow's default of 7 retries with backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None or uri in _OPENED_SQLITE:
        return MlflowClient(tracking_uri=uri)
    with sqlite_store_lock(db):  # MlflowClient creates (or migrates) the store's tables
        client = MlflowClient(tracking_uri=uri)
    _OPENED_SQLITE.add(uri)
    return client


@contextlib.contextmanager
def sqlite_store_lock(db: Path):
    """Hold an exclusive `flock` on `<db>.lock` while a process opens the SQLite store `db`.

    MLflow creates a new store's tables with alembic migrations; two processes migrating one
    fresh file at once both crash (`table _alembic_tmp_metrics already exists`) and leave it
    unusable. With the lock the first process creates the tables and the others, waiting, find
    them done. The lock goes with the file descriptor, so a killed process never leaves it held."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # an unwritable directory: MLflow's own error names it
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ==================================================================== what a run records

def flatten_config(config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """`configs_to_dict(vlm, train)` -> `{field: str(value)}`: the MLflow params.

    Field names are unique across VLMConfig and TrainConfig, so they stay unprefixed; dicts are
    JSON, everything else `str()` (so `None` -> "None", `True` -> "True")."""
    params: dict[str, str] = {}
    for section in ("vlm", "train"):
        for name, value in config[section].items():
            if name in params:
                raise ValueError(f"Config field {name!r} appears in both 'vlm' and 'train'.")
            params[name] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return params


def git_commit() -> str:
    """`$NANOVLM_GIT_COMMIT`, else the commit of this package's checkout, else "unknown"
    (a submitted job's working dir has no .git: pass the commit through the runtime env)."""
    commit = os.environ.get("NANOVLM_GIT_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def context_tags() -> dict[str, str]:
    """The tags `mlflow.start_run` adds from the process's context and `MlflowClient.create_run`
    does not (`mlflow.user`, `mlflow.source.name`/`.type`, git), with our `git_commit()`, which
    also knows a submitted job's commit. Without them the UI's User and Source columns are empty."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = resolve_tags()
    commit = git_commit()
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def default_run_name(preset: Optional[str]) -> str:
    return f"{preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_tags(config: dict[str, dict[str, Any]], *, preset: Optional[str], world_size: int,
             device_type: str, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    train = config["train"]
    dataset = train["train_dataset_path"]
    if train.get("train_dataset_name") not in (None, "", "all"):
        dataset += f":{train['train_dataset_name']}"
    commit = git_commit()
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "preset": preset or "custom",
        "dataset": dataset,
        "world_size": str(world_size),
        "device_type": device_type,
    }
    tags.update(extra or {})
    return tags


def get_or_create_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created if needed; either way tagged as model training
    (`EXPERIMENT_KIND_TAG`) unless it already has a kind."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_root(uri)
        try:
            return client.create_experiment(name, artifact_location=f"{location}/{name}" if location else None,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # noqa: BLE001 - another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def create_run(config: dict[str, dict[str, Any]], *, uri: Optional[str] = None,
               experiment_name: Optional[str] = None, run_name: Optional[str] = None,
               tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None) -> str:
    """Create an MLflow run with every config field as a param and the `context_tags()` under
    `tags`; return its id. Raises on failure (call it before training, after `check_tracking_store`)."""
    from mlflow.entities import Param

    uri = uri or default_tracking_uri()
    client = _client(uri)
    experiment_id = get_or_create_experiment(uri, experiment_name or config["train"]["experiment_name"])
    all_tags = {**context_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    params = [Param(k, v) for k, v in flatten_config(config).items()]
    for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    logger.info("MLflow run %s (experiment %r) in %s", run.info.run_id, experiment_name, masked_uri(uri))
    return run.info.run_id


def start_training_run(config: dict[str, dict[str, Any]], *, uri: str, run_name: str, tags: dict[str, str],
                       run_id: Optional[str] = None) -> str:
    """The MLflow run of a training run, before training: `run_id` (a resumed run's, from its
    checkpoint's run record) set running again, or a new run (`create_run`) if there is none or
    the store no longer has it. Params cannot change, so config fields the resumed run changes
    (e.g. max_training_steps) are recorded as one JSON tag, `RESUMED_WITH_TAG`."""
    if run_id is not None:
        client = _client(uri)
        try:
            logged = client.get_run(run_id).data.params
        except Exception as exc:  # noqa: BLE001 - e.g. deleted from the store: start a new run
            logger.warning("MLflow run %s of the resumed checkpoint is not in %s (%s); logging to a new run.",
                           run_id, masked_uri(uri), exc)
        else:
            client.update_run(run_id, status="RUNNING")
            changed = {k: v for k, v in flatten_config(config).items() if not _same_param(logged.get(k), v)}
            if changed:
                client.set_tag(run_id, RESUMED_WITH_TAG, json.dumps(changed, sort_keys=True)[:5000])
            logger.info("MLflow run %s continues (resumed) in %s", run_id, masked_uri(uri))
            return run_id
    return create_run(config, uri=uri, experiment_name=config["train"]["experiment_name"], run_name=run_name,
                      tags=tags)


def _same_param(logged: Optional[str], value: str) -> bool:
    """Whether two param strings hold one value: "10000" and "10000.0" do (a preset's int in a
    float field reads back from a checkpoint's JSON as a float)."""
    if logged == value:
        return True
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return False


def write_run_record(checkpoint_dir: str | Path, run_id: str, uri: str) -> None:
    """`mlflow_run.json` in a checkpoint: the run to continue when training resumes from it.
    Inside the checkpoint directory, it travels with every copy of it (Ray Train's included)."""
    path = Path(checkpoint_dir) / RUN_RECORD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}) + "\n")
    tmp.replace(path)


def recorded_run_id(checkpoint_dir: str | Path, uri: str) -> Optional[str]:
    """The run id in a checkpoint's run record when that run lives in store `uri`, else None."""
    path = Path(checkpoint_dir) / RUN_RECORD_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("tracking_uri") != uri:
        logger.info("Checkpoint %s was tracked in %s, not %s: a new MLflow run starts.",
                    checkpoint_dir, masked_uri(record.get("tracking_uri")), masked_uri(uri))
        return None
    return record.get("run_id")


# ==================================================================== fail-soft logging

class TrackingRun:
    """Logs to one existing MLflow run from outside training (a sweep's controller, a benchmark
    grid); every error is logged as a warning and swallowed. Training logs through
    `tracking_journal.JournaledRun` instead, which never blocks a step and loses nothing.

    Metrics are buffered and sent in batches (`flush`, every `flush_every` steps); while the store
    is down they stay buffered (up to `MAX_BUFFERED_METRICS`) and go out with the next flush that works.
    """

    def __init__(self, run_id: str, uri: Optional[str] = None, flush_every: int = 10):
        self.run_id = run_id
        self.uri = uri or default_tracking_uri()
        self.flush_every = max(1, flush_every)
        self._pending: list[Any] = []
        self._client_obj = None
        self.failures = 0

    def _guard(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            if self._client_obj is None:
                self._client_obj = _client(self.uri)
            fn(self._client_obj, *args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self.failures += 1
            logger.warning("MLflow %s failed for run %s at %s (training continues): %s: %s",
                           what, self.run_id, masked_uri(self.uri), type(exc).__name__, exc)
            return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._pending.append(Metric(key, float(value), now, int(step)))
        if len(self._pending) > MAX_BUFFERED_METRICS:
            del self._pending[: len(self._pending) - MAX_BUFFERED_METRICS]
        if step % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch = self._pending[:1000]  # MLflow's per-batch metric limit
            if not self._guard("log_batch", lambda c: c.log_batch(self.run_id, metrics=batch)):
                return
            del self._pending[: len(batch)]

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard("set_tags", lambda c: c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifacts(self, local_dir: str | Path, artifact_path: Optional[str] = None) -> None:
        self._guard("log_artifacts", lambda c: c.log_artifacts(self.run_id, str(local_dir), artifact_path))

    def log_artifact(self, local_path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._guard("log_artifact", lambda c: c.log_artifact(self.run_id, str(local_path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._guard("set_terminated", lambda c: c.set_terminated(self.run_id, status))


def load_params(run_id: str, uri: Optional[str] = None) -> dict[str, str]:
    return dict(_client(uri or default_tracking_uri()).get_run(run_id).data.params)


def iter_runs(experiment_name: str, uri: Optional[str] = None) -> Iterable[Any]:
    client = _client(uri or default_tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id])
