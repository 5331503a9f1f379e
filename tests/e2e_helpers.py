"""Start ``flwr run`` simulations from tests and stop every process they spawned.

``flwr run`` against the ``:local:`` connection starts a *detached* ``flower-superlink`` (own session)
that outlives the CLI, which spawns ``flower-superexec``, which spawns ``flwr-simulation``, which
starts Ray (gcs_server, raylet, workers...). None of them is a child of the test once the CLI has
exited, so a process group or ``ps --ppid`` walk from the CLI finds nothing. Instead every process
of a session inherits a unique environment marker (``CLIPFED_TEST_SESSION=<token>``); teardown finds
them by that marker in ``/proc/<pid>/environ`` (plus any descendants), sends SIGTERM, waits, then
SIGKILL, and checks ``ps`` that nothing naming the session's port is left.

Isolation from whatever else runs on the machine:

* ``FLWR_HOME`` is a temporary directory (own ``config.toml``, SuperLink database and logs).
* The CLI reuses *anything* answering ``/health`` on ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (default
  39091, see ``flwr/cli/constant.py`` and ``flwr/cli/local_superlink.py``), whichever ``FLWR_HOME`` it
  came from: each session picks a free port (and a free ``FLWR_LOCAL_CONTROL_API_PORT``), so it never
  reuses a SuperLink a user or another test started.
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the SuperLink must not ``uv sync`` (offline).
* ``RAY_ADDRESS=local``: Ray always starts its own instance, never joins a user's ``ray start`` cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "CLIPFED_TEST_SESSION"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_executable() -> str:
    """The ``flwr`` CLI of the running interpreter's environment (falls back to PATH)."""
    local = Path(sys.executable).parent / "flwr"
    found = str(local) if local.exists() else shutil.which("flwr")
    if not found:
        raise FileNotFoundError("no `flwr` executable next to the interpreter or on PATH")
    return found


@dataclass
class FlwrSession:
    """One isolated local-simulation environment: its own FLWR_HOME, ports and process marker."""

    home: Path
    port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_ADDRESS": "local",
                "PYTHONUNBUFFERED": "1",
                MARKER: self.token,
                # `flwr run` starts `flower-superlink` from PATH: put the environment's scripts first, so the
                # tests also work when run as `.venv/bin/python -m pytest` without activating the venv
                "PATH": os.pathsep.join([str(Path(flwr_executable()).parent), env.get("PATH", "")]),
            }
        )
        return env

    def cli(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr <args> --format json`` and return the parsed JSON (raises with the output if it fails)."""
        cmd = [flwr_executable(), *args, "--format", "json"]
        proc = subprocess.run(cmd, env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout
        try:
            doc = json.loads(out[out.index("{"):])
        except ValueError:
            raise RuntimeError(f"{' '.join(cmd)} gave no JSON (rc={proc.returncode}):\n{out}\n{proc.stderr}") from None
        if proc.returncode != 0 or not doc.get("success", False):
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{out}\n{proc.stderr}")
        return doc

    def run_app(self, app: Path, federation_config: str, run_config: str) -> int:
        """Submit ``app`` to the session's local SuperLink (started on first use); returns the run id."""
        doc = self.cli("run", str(app), "--federation-config", federation_config, "--run-config", run_config,
                       timeout=180.0)
        return int(doc["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        runs = self.cli("ls", "--run-id", str(run_id))["runs"]
        return next(r for r in runs if int(r["run-id"]) == run_id)

    def wait_finished(self, run_id: int, timeout: float = 300.0, poll: float = 3.0) -> dict[str, Any]:
        """Poll ``flwr ls`` until the run's status is ``finished:*``; returns the run's record."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run_status(run_id)
            if str(run["status"]).startswith("finished"):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run['status']!r} after {timeout:.0f}s")
            time.sleep(poll)

    def superlink_log(self) -> str:
        log = self.home / "local-superlink" / "superlink.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def pids(self) -> list[int]:
        """Live processes of this session: those carrying its marker, and their descendants."""
        return session_pids(self.token)

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every process of the session, SIGKILL what is left after ``grace`` s; returns survivors."""
        return stop_pids(self.pids, grace)


# ---------------------------------------------------------------------------- processes
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] == "Z":
            continue  # a zombie is not running; its parent (or init) reaps it
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def session_pids(token: str) -> list[int]:
    """PIDs whose environment has ``CLIPFED_TEST_SESSION=<token>``, plus all their descendants."""
    needle = f"{MARKER}={token}".encode()
    marked = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            marked.append(int(entry.name))
    children = _children_map()
    found, todo = set(marked), list(marked)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    alive = set()
    for pid in found:  # drop zombies found through the marker scan
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            alive.add(pid)
    return sorted(alive)


def stop_pids(find, grace: float = 10.0) -> list[int]:
    """Send SIGTERM to ``find()``'s PIDs, then SIGKILL whatever ``find()`` still returns after ``grace`` s.

    ``find`` is called again while waiting, so processes spawned during shutdown are caught too.
    Returns the PIDs still alive at the end (should be empty).
    """
    signalled: set[int] = set()

    def signal_all(sig: int) -> None:
        for pid in find():
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while find() and time.monotonic() < deadline:
        time.sleep(0.25)
        if set(find()) - signalled:  # spawned while shutting down
            signal_all(signal.SIGTERM)
    for _ in range(3):
        if not find():
            break
        signal_all(signal.SIGKILL)
        time.sleep(0.5)
    return find()


def processes_mentioning(text: str) -> list[str]:
    """``ps`` lines (pid + args) of running processes whose command line contains ``text``."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    me = os.getpid()
    lines = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and text in parts[2] and int(parts[0]) != me and not parts[1].startswith("Z"):
            if parts[2].startswith("ps "):
                continue
            lines.append(line.strip())
    return lines
