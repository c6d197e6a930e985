"""Where runs and sweeps live: a local or shared path, or an object-store URI (s3://, gs://).

Everything that must outlive a node goes through here: a Ray run's state (`nanovlm_run.json`,
with its MLflow run id) and summary, a sweep's state file and results. Files are read and
written with `pyarrow.fs.FileSystem.from_uri`, the call Ray Train and Tune make for their own
`storage_path`, so one string names the same place, with the same credentials, here and in Ray:

    s3://bucket/prefix   credentials as the AWS SDK finds them (AWS_ACCESS_KEY_ID and
                         AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role), AWS_DEFAULT_REGION;
                         AWS_ENDPOINT_URL for an S3-compatible server (MinIO; moto in the tests)
    gs://bucket/prefix   Google application-default credentials
    /abs/path            a local disk, or a filesystem that every node mounts (NFS)

A location is a string: a URI never goes through `pathlib.Path`, which folds `s3://b` into `s3:/b`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Optional

from nanovlm.config import ConfigError


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def resolve(location: str | Path) -> str:
    """A URI as given (without a trailing slash), or a local path made absolute."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(location, *parts))


def basename(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str | Path):
    """(pyarrow filesystem, path on it) for `location`."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(resolve(location))


def exists(location: str | Path) -> bool:
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_json(location: str | Path) -> Optional[Any]:
    """The JSON document at `location`, or None where there is none."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{location} is not valid JSON ({exc}); it was written by nanovlm and then damaged. "
                          "Restore it, or start a new run.") from None


def write_json(location: str | Path, data: Any) -> None:
    """Write `data` whole or not at all: an object store replaces an object in one request; on a
    filesystem a temporary file is renamed over the old one."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    target = path if is_uri(location) else f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(target) as stream:
        stream.write((json.dumps(data, indent=2) + "\n").encode())
    if target != path:
        fs.move(target, path)


def modified(location: str | Path) -> float:
    """Last modification time of a file (seconds since the epoch), 0 if unknown."""
    fs, path = filesystem(location)
    mtime = fs.get_file_info(path).mtime
    return mtime.timestamp() if mtime is not None else 0.0


def subdirectories(location: str | Path) -> list[str]:
    """The names of the directories directly under `location` (none if it does not exist)."""
    import pyarrow.fs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory)


def upload_dir(local_dir: str | Path, location: str | Path) -> None:
    """Copy a local directory's files to `location` (nothing to do when they are the same place)."""
    import pyarrow.fs

    if not is_uri(location) and Path(local_dir).resolve() == Path(location).resolve():
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(Path(local_dir).resolve()), path, destination_filesystem=fs)


def check_writable(location: str | Path, setting: str, fix: str) -> None:
    """`ConfigError` now, before any work, unless a file can be written at `location` (and read
    back): a missing bucket, missing credentials or an unreachable endpoint fail here in a second,
    not at the first checkpoint."""
    if not is_uri(location):
        from nanovlm.training.checkpointing import check_writable_dir

        check_writable_dir(location, setting, fix)
        return
    probe = join(location, f".nanovlm-write-check-{uuid.uuid4().hex[:8]}")
    try:
        write_json(probe, {"written_by": "nanovlm"})
        read_json(probe)
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{setting} cannot be written: {reason}. Check that the bucket exists and that the "
                          f"credentials reach it (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                          f"AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for an S3-compatible server; "
                          f"GOOGLE_APPLICATION_CREDENTIALS for gs://), or {fix}.") from None
