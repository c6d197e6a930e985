"""Which TCP ports a process tree listens on, from Linux's /proc (imported by test modules; not a
test itself). No psutil: Ray does not bring it, and /proc is all it would read."""

import os
import threading
from pathlib import Path

HAS_PROC_NET = Path("/proc/net/tcp").exists()

LOOPBACK = {"0100007F",                               # 127.0.0.1
            "0000000000000000FFFF00000100007F",       # ::ffff:127.0.0.1
            "00000000000000000000000001000000"}       # ::1


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def listeners(pids) -> set[tuple[str, int, int, str]]:
    """(local IP as /proc writes it, port, pid, process name) of each TCP socket in LISTEN state
    that one of `pids` holds."""
    owner: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in owner:  # 0A = LISTEN
                ip, port = cols[1].split(":")
                pid = owner[cols[9]]
                found.add((ip[:width], int(port, 16), pid, _name(pid)))
    return found


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120].strip()
    except OSError:
        return "?"


class ListenerWatch:
    """Polls the listening sockets of this process's tree on a thread, from `start()` to `stop()`:
    what a run opens and closes again (a training job's rendezvous store) is seen too."""

    def __init__(self, interval_s: float = 0.3):
        self.interval_s = interval_s
        self.seen: set[tuple[str, int, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener-watch", daemon=True)

    def start(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def stop(self) -> set[tuple[str, int, int, str]]:
        self._stop.set()
        self._thread.join()
        return self.seen

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= listeners(descendants(os.getpid()))
            self._stop.wait(self.interval_s)


def not_loopback(seen) -> list[str]:
    return sorted(f"{ip}:{port} pid {pid} ({name})" for ip, port, pid, name in seen if ip not in LOOPBACK)
