"""Scans of map-style datasets, kept on disk so that a dataset is scanned once, not once per run.

A map-style `VQADataset` checks every row before training (which rows are usable, and each
sample's size for packing). The result depends only on the rows and the settings that the checks
read, so it is stored under a hash of both, in `$NANOVLM_CACHE/scans/`: the trials of a sweep,
the ranks of a run and a rerun read it instead of scanning again. A file lock makes a second
process that wants the same scan wait for the first and then read its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

SCAN_VERSION = "1"   # bump when the checks change: older scans are then ignored


@dataclass
class Scan:
    """The usable rows (`indices`), each one's (tokens, images) in `sizes`, the rows skipped by
    reason with the first of each (`skipped`, `skip_details`), and the rows read to make it."""
    indices: list[int]
    sizes: dict[int, tuple[int, int]]
    skipped: Counter = field(default_factory=Counter)
    skip_details: dict[str, str] = field(default_factory=dict)
    rows_read: int = 0

    def to_json(self) -> str:
        return json.dumps({"indices": self.indices, "sizes": [list(self.sizes[i]) for i in self.indices],
                           "skipped": dict(self.skipped), "skip_details": self.skip_details,
                           "rows_read": self.rows_read}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Scan":
        data = json.loads(text)
        sizes = {i: (int(t), int(n)) for i, (t, n) in zip(data["indices"], data["sizes"])}
        return cls(data["indices"], sizes, Counter(data["skipped"]), data["skip_details"], data["rows_read"])


def scan_root() -> Path:
    from nanovlm.data.processors import cache_root
    return cache_root() / "scans"


def scan_key(parts: dict[str, Any]) -> str:
    """The hash of everything a scan depends on (values must be JSON-serialisable)."""
    text = json.dumps({"version": SCAN_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_scan(key: str | None, scan: Callable[[], Scan]) -> tuple[Scan, bool]:
    """(the scan stored under `key`, True) if there is one, else (`scan()`, False) after storing
    it. `key` None: no cache. An unreadable or unwritable cache is no error: it scans."""
    if key is None:
        return scan(), False
    path = scan_root() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError as exc:
        logger.warning("Cannot use the scan cache in %s (%s); scanning.", path.parent, exc)
        return scan(), False
    with lock:   # closing the file releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                return Scan.from_json(path.read_text()), True
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("Ignoring the unreadable scan %s (%s).", path, exc)
        result = scan()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(result.to_json())
            tmp.replace(path)
        except OSError as exc:
            logger.warning("Could not store the scan in %s (%s).", path, exc)
        return result, False
