"""The workers of one server agree on one model version through a directory they share.

`psad serve --workers N` creates the directory (PSAD_FLEET_DIR) and removes it at exit. A worker
that loads a version, by /admin/reload or by polling, writes it as the server's target; every
worker follows the target within FOLLOW_S, and a worker that starts (a replacement for a dead
one) starts on it rather than on the repository's latest. Each worker also writes what it serves,
so the worker that took the reload can answer for the whole server. Files are replaced
atomically (os.replace), so a reader never sees half of one. No lock is needed: every writer of
the target writes a version it has loaded and verified, and the last one wins. A write that fails
(the directory removed, the disk full) is logged and skipped: the worker keeps serving what it
has. A reload waits for the workers that have reported; one that is still starting reports, and
follows the target, once it has loaded its first model.

    target.json         {"version": N}
    worker-<pid>.json   {"pid", "version": serving, "refused": {version: reason}}
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

FOLLOW_S = 0.2  # how often a worker looks at the target
TARGET_FILE = "target.json"
log = logging.getLogger("psad.service")


@dataclass(frozen=True)
class WorkerState:
    pid: int
    version: int  # the version it serves
    refused: dict[int, str]  # versions it could not load, with why


def _write(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(content))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the fleet's shared state", extra={"path": str(path), "error": repr(exc)})


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or removed between listing and reading
        return None


class Fleet:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.pid = os.getpid()

    def target(self) -> int | None:
        content = _read(self.dir / TARGET_FILE)
        return None if content is None else int(content["version"])

    def set_target(self, version: int) -> None:
        _write(self.dir / TARGET_FILE, {"version": version})

    def report(self, version: int, refused: dict[int, str]) -> None:
        _write(self.state_path(self.pid), {"pid": self.pid, "version": version, "refused": refused})

    def state_path(self, pid: int) -> Path:
        return self.dir / f"worker-{pid}.json"

    def forget(self, pid: int) -> None:
        """A dead worker's state (the supervisor calls this): it no longer counts."""
        self.state_path(pid).unlink(missing_ok=True)

    def states(self) -> list[WorkerState]:
        states = []
        for path in sorted(self.dir.glob("worker-*.json")):
            content = _read(path)
            if content is not None:
                refused = {int(v): reason for v, reason in content["refused"].items()}
                states.append(WorkerState(int(content["pid"]), int(content["version"]), refused))
        return states

    async def settle(self, version: int, timeout_s: float) -> list[WorkerState]:
        """Wait until every worker serves `version` or has refused it (at most timeout_s);
        returns the workers' states as they then are."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.states()
            if all(s.version == version or version in s.refused for s in states) or time.monotonic() > deadline:
                return states
            await asyncio.sleep(FOLLOW_S / 2)
