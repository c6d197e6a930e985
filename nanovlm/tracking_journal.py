"""MLflow logging that never slows a training step and logs each step exactly once: a journal
on disk, sent to MLflow by a background thread.

    training thread (rank 0)                         background thread "nanovlm-mlflow"
    log_metrics(step) ─ one write() ─► metrics.jsonl ─► log_batch (<= 1000 values each), retried
                                                         with backoff while the store is down
    set_tags, log_artifact(s), log_model, close(status) ─► run.json ─► tags, artifacts, models, then set_terminated

Files, in `output_dir/mlflow_journal/<run_id>/`:

    run.json       {"run_id", "tracking_uri", "tags": {key: value}, "artifacts": [[local path,
                    artifact path or null], ...], "models": [[checkpoint dir, registry name or null], ...]
                    (MLflow models, nanovlm.export.mlflow_model), "status": null | "FINISHED" | "FAILED" | "KILLED",
                    "status_sent": bool,
                    "last_steps": {key: step}}            (requests not yet carried out, and history)
    metrics.jsonl  {"step": 12, "timestamp": <ms>, "metrics": {"loss": 2.31, ...}}, one line per log call
    sent.json      {"offset": <bytes of metrics.jsonl that MLflow has confirmed>}
    lock           flock of the process writing the journal (released when it dies, SIGKILL included)

Exactly once, whatever is killed when. Idempotent sends plus a re-log rule:
- Sending again is harmless: a line keeps the timestamp it was journalled with, and MLflow's SQL
  store (behind a server too) ignores a metric equal in (key, value, timestamp, step) to one it
  holds. A batch retried after a time-out, or lines past `sent.json` resent after a kill, add nothing.
- A step computed again (Ray restarts the workers from their last checkpoint, `--resume` after a
  crash or Ctrl-C) is not logged again: `log_metrics` drops a key at a step not after the last
  step the journal holds for that key. The line is on disk before `log_metrics` returns (page
  cache: it survives the process), so the journal holds every step an earlier attempt finished,
  and that attempt's value stands (a resume is exact, so the re-run computes the same loss).
  This is stronger than flushing at every checkpoint; at a checkpoint the journal is also
  fsynced, so it survives a machine crash as far as the checkpoint.

Writes off the training thread: the training thread only appends a line; memory holds one batch
at most (the journal on disk is the buffer, ~0.5 KB per step), so an outage of any length loses
nothing and costs the step nothing. `close` waits for the thread up to a deadline
(`NANOVLM_TRACKING_DEADLINE_S`, default 30 s); what MLflow lacks then stays in the journal, and
`nanovlm tracking sync DIR` (`sync`) sends it later. The journal itself stays after the run,
compacted to `last_steps` once MLflow has everything: a later resume reads it to log no step twice.

Across nodes: the journal lives in `output_dir` on rank 0's node. A rank 0 that Ray restarts on
another node (output_dir not shared) starts an empty journal there, so the re-log rule above
cannot see its predecessor's steps; MLflow can. Before a process sends anything, its sender
reads the last step MLflow holds for each metric of the run (`store_floor`), and never sends a
value at or before it: the steps the predecessor sent are not logged again (values are sent in
step order, so MLflow holds every step up to that one). What the predecessor journalled but had
not sent yet travels in each training checkpoint (`save_unsent`, `UNSENT_FILE`): the successor
resumes from a checkpoint, journals those steps (`adopt`) and sends the ones MLflow lacks; the
steps after the checkpoint it computes, and logs, again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from nanovlm import tracking

logger = logging.getLogger(__name__)

JOURNAL_DIRNAME = "mlflow_journal"
UNSENT_FILE = "mlflow_unsent.jsonl"   # in a training checkpoint: the journal's lines MLflow may lack
DEADLINE_ENV = "NANOVLM_TRACKING_DEADLINE_S"
DEFAULT_DEADLINE_S = 30.0
BATCH_METRICS = 1000          # MLflow's limit of metric values per log_batch
READ_BYTES = 1 << 18          # of metrics.jsonl per read: ~400 steps, more than one batch
SEND_PERIOD_S = 5.0           # a slow run's metrics reach MLflow at least this often
MAX_BACKOFF_S = 4.0           # between tries while the store is down (the client retries ~6 s itself)
LOCK_WAIT_S = 30.0            # for a journal still locked by a process that is ending (a Ray restart)


def deadline_s() -> float:
    """How long the end of a run waits for MLflow: `$NANOVLM_TRACKING_DEADLINE_S`, else 30 s."""
    return float(os.environ.get(DEADLINE_ENV) or DEFAULT_DEADLINE_S)


def journal_dir(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / JOURNAL_DIRNAME / run_id


class JournalBusy(RuntimeError):
    """Another live process writes this journal."""


# ==================================================================== the files

class RunJournal:
    """The journal of one MLflow run, opened by one process (it holds the flock); its training
    thread appends and its sender thread reads and marks what MLflow took."""

    def __init__(self, directory: Path, *, run_id: Optional[str] = None, uri: Optional[str] = None,
                 wait_s: float = 0.0, must_lock: bool = True):
        self.dir = Path(directory)
        self._mutex = threading.Lock()
        self._closed = False
        self._metrics_path = self.dir / "metrics.jsonl"
        self._lock_fd, self._locked = _lock(self.dir, create=run_id is not None, wait_s=wait_s,
                                            must_lock=must_lock)
        run = _read_json(self.dir / "run.json")
        if run is None:
            if run_id is None:
                os.close(self._lock_fd)
                raise FileNotFoundError(f"{self.dir} is not an MLflow journal (no run.json).")
            run = {"run_id": run_id, "tracking_uri": uri, "tags": {}, "artifacts": [], "status": None,
                   "status_sent": False, "last_steps": {}}
        self.run = run
        run.setdefault("tags", {})
        run.setdefault("models", [])
        self.run_id: str = run["run_id"]
        self.uri: str = run["tracking_uri"]
        self.sent = int((_read_json(self.dir / "sent.json") or {}).get("offset", 0))
        self._fd = os.open(self._metrics_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        if self._locked:  # else the line may be one that its writer is still writing
            self._drop_partial_line()
        self.last_steps: dict[str, int] = {k: int(v) for k, v in run.get("last_steps", {}).items()}
        for entry in self._entries(0, None)[0]:
            for key in entry["metrics"]:
                self.last_steps[key] = max(self.last_steps.get(key, entry["step"]), entry["step"])
        self._save_run()

    # ---- metrics
    def append(self, step: int, values: dict[str, float], timestamp: Optional[int] = None) -> None:
        """One line, one write(): on disk (in the page cache) when this returns."""
        stamp = int(time.time() * 1000) if timestamp is None else timestamp
        line = json.dumps({"step": step, "timestamp": stamp, "metrics": values})
        os.write(self._fd, (line + "\n").encode())
        for key in values:
            self.last_steps[key] = step

    def logged(self, key: str, step: int) -> bool:
        """Whether the journal already holds `key` at `step` or a later step."""
        return step <= self.last_steps.get(key, -1)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def unsent(self) -> tuple[list[dict[str, Any]], int]:
        """Complete lines after what MLflow has (about one batch), and the offset after them."""
        with self._mutex:
            start = self.sent
        return self._entries(start, BATCH_METRICS)

    def all_unsent(self) -> list[dict[str, Any]]:
        """Every complete line after what MLflow has."""
        with self._mutex:
            start = self.sent
        return self._entries(start, None)[0]

    def mark_sent(self, offset: int) -> None:
        with self._mutex:
            if self._closed:  # a send that outlived close(): MLflow dedupes it when sync sends it again
                return
            self.sent = offset
            _write_json(self.dir / "sent.json", {"offset": offset})

    # ---- tags, artifacts and the end status
    def add_tags(self, tags: dict[str, str]) -> None:
        with self._mutex:
            self.run["tags"].update({k: str(v) for k, v in tags.items()})
            self._save_run()

    def tags(self) -> dict[str, str]:
        with self._mutex:
            return dict(self.run["tags"])

    def tags_sent(self, tags: dict[str, str]) -> None:
        with self._mutex:
            if self._closed:
                return
            for key, value in tags.items():
                if self.run["tags"].get(key) == value:
                    del self.run["tags"][key]
            self._save_run()

    # Artifacts and models wait in the same way: a list of [local path, name or null] entries in
    # run.json ("artifacts": artifact path; "models": registry name), each removed once sent.
    def queue(self, kind: str, local_path: str | Path, name: Optional[str]) -> None:
        with self._mutex:
            self.run[kind].append([str(Path(local_path).resolve()), name])
            self._save_run()

    def queued(self, kind: str) -> list[tuple[str, Optional[str]]]:
        with self._mutex:
            return [tuple(entry) for entry in self.run[kind]]

    def dequeue(self, kind: str, local_path: str, name: Optional[str]) -> None:
        with self._mutex:
            if self._closed:
                return
            self.run[kind].remove([local_path, name])
            self._save_run()

    def request_status(self, status: Optional[str]) -> None:
        """The run's end status to send once everything else is in (None: the run goes on)."""
        with self._mutex:
            self.run["status"], self.run["status_sent"] = status, False
            self._save_run()

    def unsent_status(self) -> Optional[str]:
        with self._mutex:
            return None if self.run["status_sent"] else self.run["status"]

    def status_sent(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self.run["status_sent"] = True
            self._save_run()

    # ---- state
    def pending(self) -> bool:
        """Whether MLflow lacks anything this journal holds."""
        with self._mutex:
            return (self.sent < os.fstat(self._fd).st_size or bool(self.run["tags"]) or bool(self.run["artifacts"])
                    or bool(self.run["models"]) or (self.run["status"] is not None and not self.run["status_sent"]))

    def describe_pending(self) -> str:
        """What MLflow lacks, in words: "412 metric values (steps 31-60), 2 artifacts, the end status FINISHED"."""
        entries = self._entries(self.sent, None)[0]
        parts = []
        if entries:
            n = sum(len(e["metrics"]) for e in entries)
            parts.append(f"{n} metric values (steps {entries[0]['step']}-{max(e['step'] for e in entries)})")
        if self.run["tags"]:
            parts.append(f"{len(self.run['tags'])} tags")
        if self.run["artifacts"]:
            parts.append(f"{len(self.run['artifacts'])} artifacts")
        if self.run["models"]:
            parts.append(f"{len(self.run['models'])} MLflow model(s)")
        if self.unsent_status():
            parts.append(f"the end status {self.run['status']}")
        return ", ".join(parts) or "nothing"

    def compact(self) -> None:
        """Once MLflow has every line: keep only the last step per key (the re-log rule's memory).
        Only by the lock's holder: another writer could be appending."""
        with self._mutex:
            if not self._locked or self.sent < os.fstat(self._fd).st_size:
                return
            self.run["last_steps"] = dict(self.last_steps)
            self._save_run()
            os.ftruncate(self._fd, 0)
            self.sent = 0
            _write_json(self.dir / "sent.json", {"offset": 0})

    def close(self) -> None:
        """Close the files and release the flock; a sender thread still running changes nothing after this."""
        with self._mutex:
            self._closed = True
            os.close(self._fd)
            os.close(self._lock_fd)

    # ---- helpers
    def _save_run(self) -> None:
        _write_json(self.dir / "run.json", self.run)

    def _entries(self, start: int, max_values: Optional[int]) -> tuple[list[dict[str, Any]], int]:
        entries: list[dict[str, Any]] = []
        end, count = start, 0
        with open(self._metrics_path, "rb") as f:
            f.seek(start)
            while data := f.read(READ_BYTES if max_values is not None else -1):
                lines = data.split(b"\n")
                for line in lines[:-1]:  # the last piece is empty or a line still being written
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        logger.warning("Skipping a corrupt line of %s at byte %d.", self._metrics_path, end)
                        entry = None
                    if entry is not None:
                        if max_values is not None and entries and count + len(entry["metrics"]) > max_values:
                            return entries, end
                        entries.append(entry)
                        count += len(entry["metrics"])
                    end += len(line) + 1
                if max_values is None or len(lines) == 1:
                    break
                f.seek(end)
        return entries, end

    def _drop_partial_line(self) -> None:
        """A process killed in the middle of a write leaves a line without its newline: that
        step was not journalled (and never sent), so it goes."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self._metrics_path, "rb") as f:
            data = f.read()
        if not data.endswith(b"\n"):
            os.ftruncate(self._fd, data.rfind(b"\n") + 1)


def _lock(directory: Path, *, create: bool, wait_s: float, must_lock: bool) -> tuple[int, bool]:
    """Take the journal's flock (waiting up to `wait_s`); if another process holds it, raise
    `JournalBusy` naming it, or with `must_lock=False` log that and go on without the lock."""
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist.")
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    give_up = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= give_up:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                message = (f"The MLflow journal {directory} is being written by process {holder}; "
                           "sync it once that run has ended.")
                if not must_lock:  # a process that should be gone by now; both journal the same steps
                    # Not waiting at all was the caller's choice (it expects the writer): no warning.
                    logger.log(logging.WARNING if wait_s > 0 else logging.DEBUG, "%s Writing it anyway.", message)
                    return fd, False
                os.close(fd)
                raise JournalBusy(message) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, True


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


# ==================================================================== sending

def store_floor(client, run_id: str) -> dict[str, int]:
    """{metric key: the last step MLflow holds for it} of a run (one request: the run's latest metrics)."""
    run = client.get_run(run_id)
    return {metric.key: int(metric.step) for metric in getattr(run.data, "_metric_objs", [])}


def send_pending(journal: RunJournal, client, should_stop: Callable[[], bool] = lambda: False,
                 uri: Optional[str] = None, floor: Optional[dict[str, int]] = None) -> int:
    """Send what MLflow lacks: the metrics in batches, the tags, the artifacts, the models, then the
    end status (to `uri`, default the journal's store, which `client` is for). Raises the store's
    first error; what went through is marked, so calling again continues. `floor` ({key: step}):
    values at or before these steps are not sent (MLflow has those steps from an earlier process).
    Returns how many values that left out."""
    from mlflow.entities import Metric, RunTag

    floor = floor or {}
    left_out = 0
    while not should_stop():
        entries, end = journal.unsent()
        if not entries:
            break
        metrics = [Metric(key, value, entry["timestamp"], entry["step"])
                   for entry in entries for key, value in entry["metrics"].items()]
        kept = [m for m in metrics if m.step > floor.get(m.key, -1)]
        left_out += len(metrics) - len(kept)
        metrics = kept
        for i in range(0, len(metrics), BATCH_METRICS):
            client.log_batch(journal.run_id, metrics=metrics[i:i + BATCH_METRICS])
        journal.mark_sent(end)
    tags = journal.tags()
    if tags and not should_stop():
        client.log_batch(journal.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        journal.tags_sent(tags)
    for local_path, artifact_path in journal.queued("artifacts"):
        if should_stop():
            return left_out
        path = Path(local_path)
        if path.is_dir():
            client.log_artifacts(journal.run_id, local_path, artifact_path)
        elif path.exists():
            client.log_artifact(journal.run_id, local_path, artifact_path)
        else:
            logger.warning("Artifact %s of MLflow run %s no longer exists; not uploaded.", local_path, journal.run_id)
        journal.dequeue("artifacts", local_path, artifact_path)
    for checkpoint, registered_model_name in journal.queued("models"):
        if should_stop():
            return left_out
        if Path(checkpoint).is_dir():
            from nanovlm.export.mlflow_model import log_model
            log_model(journal.run_id, uri or journal.uri, checkpoint, registered_model_name)
        else:
            logger.warning("Checkpoint %s of MLflow run %s no longer exists; its model is not logged.", checkpoint,
                           journal.run_id)
        journal.dequeue("models", checkpoint, registered_model_name)
    status = journal.unsent_status()
    if status is not None and not should_stop():
        client.set_terminated(journal.run_id, status)
        journal.status_sent()
    return left_out


class JournaledRun:
    """Log one existing MLflow run from training: `log_metrics` appends to the run's journal in
    `output_dir`, a daemon thread sends it. No method blocks on the store except `close`, which
    waits up to its deadline."""

    def __init__(self, run_id: str, uri: str, output_dir: str | Path, *, flush_every: int = 10,
                 lock_wait_s: float = LOCK_WAIT_S):
        """lock_wait_s: how long to wait for a process still writing this journal (a restarted Ray
        worker's predecessor) before writing beside it; 0 where that process is expected to go on
        for a moment (the workers of a trial Tune stopped, whose journal the sweep settles later)."""
        self.run_id, self.uri = run_id, uri
        self.flush_every = max(1, flush_every)
        self.journal = RunJournal(journal_dir(output_dir, run_id), run_id=run_id, uri=uri, wait_s=lock_wait_s,
                                  must_lock=False)
        self.journal.request_status(None)  # running (again)
        self.failures = 0      # failed tries to reach the store
        self.skipped = 0       # values of steps an earlier attempt logged
        self.left_out = 0      # values the sender did not send: MLflow had their steps (store_floor)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sent = threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name="nanovlm-mlflow", daemon=True)
        self._wake.set()  # open the store now (importing MLflow takes a second), not at the first send
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        new = {k: v for k, v in values.items() if not self.journal.logged(k, step)}
        self.skipped += len(values) - len(new)
        if new:
            self.journal.append(step, new)
        if step % self.flush_every == 0:
            self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.journal.add_tags(tags)
        self._wake.set()

    def log_artifacts(self, local_dir: str | Path, artifact_path: Optional[str] = None) -> None:
        self.journal.queue("artifacts", local_dir, artifact_path)
        self._wake.set()

    def log_artifact(self, local_path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.log_artifacts(local_path, artifact_path)

    def log_model(self, checkpoint: str | Path, registered_model_name: Optional[str] = None) -> None:
        """The model in `checkpoint` as an MLflow model of this run (nanovlm.export.mlflow_model)."""
        self.journal.queue("models", checkpoint, registered_model_name)
        self._wake.set()

    def checkpoint(self) -> None:
        """At a training checkpoint: the journal to stable storage, and a send."""
        self.journal.fsync()
        self._wake.set()

    def save_unsent(self, checkpoint_dir: str | Path) -> None:
        """Into a training checkpoint: the steps MLflow may not have yet (`UNSENT_FILE`). The journal
        stays on this node; a successor on another node resumes from the checkpoint and `adopt`s them."""
        lines = "".join(json.dumps(entry) + "\n" for entry in self.journal.all_unsent())
        Path(checkpoint_dir, UNSENT_FILE).write_text(lines)

    def adopt(self, checkpoint_dir: str | Path) -> int:
        """Journal the steps a checkpoint carries (`save_unsent`) that this journal lacks, with their
        own timestamps; the sender leaves out those MLflow has. Returns how many values were added."""
        path = Path(checkpoint_dir, UNSENT_FILE)
        added = 0
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            new = {k: v for k, v in entry["metrics"].items() if not self.journal.logged(k, entry["step"])}
            if new:
                self.journal.append(entry["step"], new, entry["timestamp"])
                added += len(new)
        if added:
            self._wake.set()
        return added

    def close(self, status: Optional[str], deadline: Optional[float] = None) -> Optional[Path]:
        """End this process's logging: ask for `status` (None: another process ends the run)
        and wait up to `deadline` seconds (default `deadline_s()`) for MLflow to take
        everything. Returns None when it did, else the journal's directory, which holds the rest."""
        self.journal.request_status(status)
        self._wake.set()
        give_up = time.monotonic() + (deadline_s() if deadline is None else deadline)
        with self._sent:
            while self.journal.pending() and (left := give_up - time.monotonic()) > 0:
                self._sent.wait(min(left, 0.5))
        self._stopping.set()
        self._wake.set()
        complete = not self.journal.pending()
        if complete:
            self._thread.join(timeout=5)
            self.journal.compact()
        if self.skipped or self.left_out:
            logger.info("MLflow run %s: %d values of steps logged before a restart were not logged again.",
                        self.run_id, self.skipped + self.left_out)
        description = self.journal.describe_pending()
        self.journal.close()
        if complete:
            return None
        logger.warning("MLflow store %s did not take everything before the %.0f s deadline; %s of run %s wait "
                       "in %s. Send them with: nanovlm tracking sync %s", tracking.masked_uri(self.uri),
                       deadline_s() if deadline is None else deadline, description, self.run_id,
                       self.journal.dir, self.journal.dir)
        return self.journal.dir

    def _send_loop(self) -> None:
        client, floor = None, None
        backoff, down_since = 0.5, None
        while not self._stopping.is_set():
            self._wake.wait(SEND_PERIOD_S)
            self._wake.clear()
            try:
                client = client or tracking._client(self.uri)
                # what MLflow held before this process sent anything (see "Across nodes")
                floor = store_floor(client, self.run_id) if floor is None else floor
                self.left_out += send_pending(self.journal, client, should_stop=self._stopping.is_set, floor=floor)
            except Exception as exc:  # noqa: BLE001 - kept in the journal, tried again
                self.failures += 1
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("MLflow store %s failed (%s: %s); training goes on, the metrics wait in %s "
                                   "and are sent when it answers.", self.uri,
                                   type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", self.journal.dir)
                self._stopping.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                self._wake.set()
            else:
                if down_since is not None:
                    logger.info("MLflow store %s answers again after %.0f s; sent what waited.",
                                self.uri, time.monotonic() - down_since)
                backoff, down_since = 0.5, None
            finally:
                with self._sent:
                    self._sent.notify_all()


# ==================================================================== sync

@dataclass
class SyncResult:
    journal: Path
    run_id: Optional[str]
    sent: str                    # what was pending, in words ("nothing" when MLflow had it all)
    status: Optional[str]        # the end status set, if any
    error: Optional[str] = None  # why not (the store is still down, the journal is busy, ...)


def find_journals(path: str | Path) -> list[Path]:
    """The journal directories in `path`: one journal, a `mlflow_journal` folder, a run's
    output_dir, or any folder above them (a sweep directory)."""
    path = Path(path).expanduser().resolve()
    if (path / "run.json").is_file():
        return [path]
    if path.name == JOURNAL_DIRNAME:
        return sorted(p.parent for p in path.glob("*/run.json"))
    return sorted(p.parent for p in path.glob(f"**/{JOURNAL_DIRNAME}/*/run.json"))


def pending_journals(path: str | Path) -> list[Path]:
    """The journals under `path` that hold something MLflow lacks (or that a live process writes)."""
    pending = []
    for directory in find_journals(path):
        try:
            journal = RunJournal(directory)
        except JournalBusy:
            pending.append(directory)
            continue
        if journal.pending():
            pending.append(directory)
        journal.close()
    return pending


def sync(path: str | Path, uri: Optional[str] = None) -> list[SyncResult]:
    """Send every journal under `path` to its MLflow store (or `uri`): metrics, artifacts, the end
    status. A journal whose writer died without ending its run (status none) ends it FAILED
    if MLflow still has it RUNNING. Raises FileNotFoundError when `path` holds no journal."""
    journals = find_journals(path)
    if not journals:
        raise FileNotFoundError(f"{path} holds no MLflow journal ({JOURNAL_DIRNAME}/<run id>/run.json).")
    return [_sync_one(directory, uri) for directory in journals]


def settle(path: str | Path, wait_s: float = LOCK_WAIT_S) -> list[Path]:
    """Send what the journals under `path` still hold and return those that still hold something.
    A journal that a process still writes is waited for, up to `wait_s` each: the workers of a
    trial that Tune stopped go on for a moment after its run was ended, and may journal a step."""
    for directory in pending_journals(path):
        _sync_one(directory, None, wait_s=wait_s)
    return pending_journals(path)


def _sync_one(directory: Path, uri: Optional[str], wait_s: float = 0.0) -> SyncResult:
    try:
        journal = RunJournal(directory, wait_s=wait_s)
    except JournalBusy as exc:
        return SyncResult(directory, None, "nothing", None, str(exc))
    try:
        store = uri or journal.uri
        what = journal.describe_pending()
        try:
            client = tracking._client(tracking.check_tracking_store(store))
            if journal.run["status"] is None and client.get_run(journal.run_id).info.status == "RUNNING":
                journal.request_status("FAILED")  # its process died without ending it
                what = journal.describe_pending() + " (its process ended without ending the run)"
            status = journal.unsent_status()
            send_pending(journal, client, uri=store)
        except Exception as exc:  # noqa: BLE001 - reported per journal; it stays for the next try
            return SyncResult(directory, journal.run_id, what, None,
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        journal.compact()
        return SyncResult(directory, journal.run_id, what, status)
    finally:
        journal.close()

