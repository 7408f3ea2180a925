"""Each framework peer's own virtualenv, under var/peers/<name>, built on first use.

A framework's pins (BentoML's, Ray's) may disagree with the project's FastAPI, Starlette and pydantic,
so none is installed into the project's environment. The virtualenv is made from this interpreter's
base Python without system site-packages and gets the framework, the project's runtime pins read from
this interpreter (the same onnxruntime, numpy, redis and hiredis, so the model and the profile read are
the same code) and this checkout (`pip install -e REPO --no-deps`: the peers' apps import its code).
pip runs under an exclusive lock on a file shared by every checkout on the machine, so concurrent
builds do not race. A virtualenv counts as built once its stamp file records the install commands.
"""

from __future__ import annotations

import fcntl
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from loadtest.peers.registry import REPO, Peer

ROOT = REPO / "var" / "peers"
STAMP = "psad-peer-built"
PINNED = ("onnxruntime", "numpy", "redis", "hiredis", "orjson")  # what the peers' shared work imports
PIP_LOCK = Path(tempfile.gettempdir()) / "psad-pip.lock"


def venv_dir(peer: Peer) -> Path:
    return ROOT / peer.name


def bin_dir(peer: Peer) -> Path:
    """Where the peer's commands are: this interpreter's for a peer without a framework to install."""
    return venv_dir(peer) / "bin" if peer.framework else Path(sys.executable).parent


def built(peer: Peer) -> bool:
    return not peer.framework or (venv_dir(peer) / STAMP).is_file()


def install_commands(peer: Peer) -> list[list[str]]:
    """The commands that build the peer's virtualenv, in order."""
    pip = [str(venv_dir(peer) / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pins = [f"{name}=={version(name)}" for name in PINNED]
    return [
        [sys._base_executable, "-m", "venv", "--clear", str(venv_dir(peer))],  # type: ignore[attr-defined]
        [*pip, *peer.framework, *pins],
        [*pip, "--no-deps", "-e", str(REPO)],
    ]


def build_hint(peer: Peer) -> str:
    """The command that builds the peer's virtualenv (and runs it once), for messages."""
    return f"psad bench peers --peers psad,{peer.name} --build"


def build(peer: Peer, log: Path) -> float:
    """Build the peer's virtualenv (pip's output in `log`); the seconds it took. RuntimeError naming
    the failed command and the log."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    (venv_dir(peer) / STAMP).unlink(missing_ok=True)
    commands = install_commands(peer)
    with log.open("ab") as out, PIP_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for cmd in commands:
            out.write(f"$ {shlex.join(cmd)}\n".encode())
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building the {peer.name} peer failed at `{shlex.join(cmd)}`; see {log}")
    (venv_dir(peer) / STAMP).write_text("\n".join(shlex.join(c) for c in commands) + "\n")
    return time.monotonic() - start
