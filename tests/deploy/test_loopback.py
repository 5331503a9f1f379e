"""docker-compose.yml's topology as real processes on 127.0.0.1, driven by the flwr CLI.

One ``flower-superlink --isolation process``, a ``flower-superexec`` for the ServerApp, N = 3
``flower-supernode --isolation process`` (partition 2 attacks via run-config ``malicious-ids``),
each with its ClientApp ``flower-superexec``; then ``flwr run <app> loop --format json`` with a
temporary ``FLWR_HOME`` and ``flwr ls`` until the run has finished. Variants: plain HTTP
(``fedavg``, ``clipfed``), TLS everywhere + SuperNode authentication with the certificates and
keys of ``docker/gen-certs.sh`` and ``docker/gen-supernode-keys.sh``, and a SuperNode killed
(SIGKILL) in the middle of the run.

Every process is started in its own session; teardown signals each process of those sessions by
PID (SIGTERM, then SIGKILL after a grace period; this includes the ``flwr-serverapp`` /
``flwr-clientapp`` children the SuperExecs spawn) and asserts that none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NUM_NODES = 3
ATTACKER = 2
RUN_DEADLINE_S = 600.0   # measured: 150-190 s per 2-round run on 2 cores shared with other jobs (load ~10)
STOP_GRACE_S = 20.0      # SuperLink/SuperNode take several seconds to shut down on SIGTERM under load
FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")

pytestmark = pytest.mark.slow


def tool(name: str) -> str:
    """The Flower executable next to this interpreter (the project's venv), else on PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install flwr==1.42.0)")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- processes, by session ------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a live process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3])


def session_members(sessions: set[int]) -> dict[int, int]:
    """pid -> session for every process that is not a zombie and belongs to one of ``sessions``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := proc_stat(int(entry.name))) and st[0] != "Z" and st[2] in sessions:
            out[int(entry.name)] = st[2]
    return out


def children(pid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and (st := proc_stat(int(e.name))) and st[1] == pid and st[0] != "Z"]


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Federation:
    """A SuperLink, its ServerApp SuperExec and N SuperNodes with their ClientApp SuperExecs."""

    def __init__(self, workdir: Path, num_nodes: int = NUM_NODES, certs: Path | None = None,
                 keys: Path | None = None) -> None:
        self.workdir, self.num_nodes, self.certs, self.keys = workdir, num_nodes, certs, keys
        self.link_port, *self.node_ports = free_ports(1 + num_nodes)
        self.procs: dict[str, subprocess.Popen] = {}
        self.cli_home = workdir / "home" / "cli"
        self.cli_home.mkdir(parents=True)
        conn = f'address = "127.0.0.1:{self.link_port}"\n'
        conn += f'root-certificates = "{certs / "ca.crt"}"\n' if certs else "insecure = true\n"
        (self.cli_home / "config.toml").write_text(f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\n{conn}')

    # -- plumbing
    def env(self, home: str) -> dict[str, str]:
        flwr_home = self.workdir / "home" / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def spawn(self, name: str, *argv: str) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([tool(argv[0]), *argv[1:]], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env(name), cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"----- {name} (exit {p.poll()}) -----\n" + "\n".join(self.log(name).splitlines()[-lines:])
                         for name, p in self.procs.items())

    def link_tls(self) -> list[str]:
        if not self.certs:
            return ["--insecure"]
        c = self.certs
        return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "superlink.pem"),
                "--ssl-keyfile", str(c / "superlink.key")]

    def client_tls(self) -> list[str]:
        return ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]

    # -- the services of docker-compose.yml (+ docker-compose.tls.yml when certs are given)
    def start_superlink(self) -> None:
        auth = ["--enable-supernode-auth"] if self.keys else []
        self.spawn("superlink", "flower-superlink", *self.link_tls(), *auth, "--isolation", "process",
                   "--host", "127.0.0.1", "--port", str(self.link_port), "--database", str(self.workdir / "state.db"),
                   "--disable-runtime-dependency-installation")
        self.wait_healthy("superlink", self.link_port)

    def start_serverapp_exec(self) -> None:
        self.spawn("superexec-serverapp", "flower-superexec", *self.client_tls(),
                   "--runtime-api-address", f"127.0.0.1:{self.link_port}")

    def start_node(self, i: int, key: Path | None = None, name: str | None = None,
                   extra: tuple[str, ...] = ()) -> subprocess.Popen:
        name = name or f"supernode-{i}"
        port = self.node_ports[i] if name == f"supernode-{i}" else free_ports(1)[0]
        argv = ["flower-supernode", *self.client_tls(), "--superlink", f"127.0.0.1:{self.link_port}",
                "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"]
        if self.certs:
            c = self.certs
            argv += ["--ssl-certfile", str(c / f"supernode-{i}.pem"), "--ssl-keyfile", str(c / f"supernode-{i}.key"),
                     "--ssl-ca-certfile", str(c / "ca.crt")]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        return self.spawn(name, *argv, *extra)

    def start_clientapp_exec(self, i: int) -> None:
        self.spawn(f"superexec-clientapp-{i}", "flower-superexec", *self.client_tls(),
                   "--runtime-api-address", f"127.0.0.1:{self.node_ports[i]}")

    def start_nodes(self) -> None:
        for i in range(self.num_nodes):
            self.start_node(i, self.keys / f"supernode-{i}" if self.keys else None)
            self.start_clientapp_exec(i)

    def wait_healthy(self, name: str, port: int, deadline_s: float = 120.0) -> None:
        scheme = "https" if self.certs else "http"
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt")) if self.certs else None
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{self.tails()}")
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=5, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"{name} did not answer GET /health on {port} within {deadline_s:.0f}s:\n{self.tails()}")

    # -- the flwr CLI
    def cli(self, *args: str, timeout: float = 300.0) -> dict:
        res = subprocess.run([tool("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                             env=self.env("cli"), cwd=self.workdir, timeout=timeout)
        start = res.stdout.find("{")
        try:
            out = json.loads(res.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            out = {}
        if res.returncode != 0 or not out.get("success"):
            pytest.fail(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{self.tails()}")
        return out

    def register_keys(self) -> None:
        """``flwr supernode register`` every SuperNode's public key (concurrently: each CLI call imports flwr)."""
        calls = [subprocess.Popen([tool("flwr"), "supernode", "register", str(self.keys / f"supernode-{i}.pub"), "loop",
                                   "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=self.env("cli"), cwd=self.workdir) for i in range(self.num_nodes)]
        for i, call in enumerate(calls):
            out, _ = call.communicate(timeout=300)
            assert call.returncode == 0 and '"success": true' in out, f"register supernode-{i}:\n{out}"

    def submit(self, app_dir: Path, run_config: str) -> int:
        return int(self.cli("run", str(app_dir), "loop", "--run-config", run_config)["run-id"])

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink keeps it (``flwr log --show``)."""
        res = subprocess.run([tool("flwr"), "log", str(run_id), "loop", "--show"], capture_output=True, text=True,
                             env=self.env("cli"), cwd=self.workdir, timeout=300)
        return res.stdout[-6000:] + res.stderr[-2000:]

    def status(self, run_id: int) -> dict:
        (run,) = self.cli("ls", "loop", "--run-id", str(run_id))["runs"]
        return run

    def wait_finished(self, run_id: int, metrics: Path, deadline_s: float = RUN_DEADLINE_S) -> dict:
        """Poll ``flwr ls`` until the run has finished.

        Each ``flwr ls`` costs a second or more of CPU (it imports flwr), which the federation itself
        needs on a small machine: between calls, cheap hints (the ServerApp wrote
        ``status`` completed/failed, or its process is gone) trigger the next call early.
        """
        end, next_ls, serverapp_seen = time.monotonic() + deadline_s, 0.0, False
        while time.monotonic() < end:
            running_apps = children(self.procs["superexec-serverapp"].pid)
            serverapp_seen |= bool(running_apps)
            hint = (serverapp_seen and not running_apps) or _metrics_status(metrics) in ("completed", "failed")
            if hint or time.monotonic() >= next_ls:
                run = self.status(run_id)
                if run["status"].startswith("finished"):
                    return run
                next_ls = time.monotonic() + (1.0 if hint else 15.0)
            time.sleep(0.5)
        pytest.fail(f"run {run_id} not finished after {deadline_s:.0f}s:\n{self.tails()}")

    # -- teardown
    def sessions(self) -> set[int]:
        return {p.pid for p in self.procs.values()}  # start_new_session: session id = leader's pid

    def kill(self, *names: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of these services' sessions (the service and what it spawned).

        With SIGKILL, repeat until the sessions are empty: a process dying right now, or one
        spawned between listing and signalling, shows up in /proc for a moment longer.
        """
        sessions = {self.procs[n].pid for n in names}
        signal_all(list(session_members(sessions)), sig)
        if sig != signal.SIGKILL:
            return
        for n in names:
            self.procs[n].wait(timeout=30)
        end = time.monotonic() + 15
        while (left := session_members(sessions)) and time.monotonic() < end:
            signal_all(list(left), sig)
            time.sleep(0.2)

    def stop(self) -> dict[int, int]:
        """SIGTERM every process of our sessions by PID, SIGKILL what is left; returns survivors (none)."""
        sessions = self.sessions()
        signal_all(list(session_members(sessions)), signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_S
        while session_members(sessions) and time.monotonic() < end:
            for p in self.procs.values():
                p.poll()
            time.sleep(0.3)
        signal_all(list(session_members(sessions)), signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        end = time.monotonic() + 10
        while (left := session_members(sessions)) and time.monotonic() < end:
            time.sleep(0.2)
        return left


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app as `flwr run` bundles it: pyproject.toml, README, LICENSE and the wheel's packages.

    Passing the repository root works too and builds the same app, but Flower's FAB builder walks
    and resolves every file below the app directory before filtering, .venv included (~55k
    files): that alone took 60-90 s per `flwr run` on a loaded 2-core machine.
    """
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc to find the processes the Flower services spawn")
    for name in FLOWER_TOOLS:
        tool(name)
    out = tmp_path_factory.mktemp("app")
    with open(ROOT / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, out / name)
    for pkg in packages:
        shutil.copytree(ROOT / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


@pytest.fixture
def federations(tmp_path: Path) -> Iterator[list[Federation]]:
    """Federations a test starts; stopped (and checked for leftovers) even when the test fails."""
    started: list[Federation] = []
    yield started
    leftovers = {}
    for fed in started:
        leftovers.update(fed.stop())
    assert not leftovers, f"processes left running after teardown: {leftovers}"


@pytest.fixture(scope="module")
def plain_federation(tmp_path_factory: pytest.TempPathFactory, app_dir: Path) -> Iterator[Federation]:
    """docker-compose.yml's federation, shared by the runs that leave it intact; stopped at the end."""
    fed = Federation(tmp_path_factory.mktemp("plain"))
    try:
        fed.start_superlink()
        fed.start_serverapp_exec()
        fed.start_nodes()
        yield fed
    finally:
        leftovers = fed.stop()
    assert not leftovers, f"processes left running after teardown: {leftovers}"


def run_config(results: Path, run_name: str, defense: str = "fedavg", rounds: int = 2, extra: str = "") -> str:
    return (f'num-clients={NUM_NODES} num-server-rounds={rounds} local-epochs=1 malicious-ids="{ATTACKER}" '
            f'defense="{defense}" results-dir="{results}" run-name="{run_name}" cache-dir="{results / "cache"}" '
            f"{extra}").strip()


def _metrics_status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def assert_completed(fed: Federation, run: dict, results: Path, run_name: str, rounds: int = 2) -> list[dict]:
    if run["status"] != "finished:completed":
        pytest.fail(f"run {run['run-id']}: {run['status']} ({run.get('status-details')})\n"
                    f"----- flwr log -----\n{fed.run_log(int(run['run-id']))}\n{fed.tails()}")
    doc = json.loads((results / run_name / "metrics.json").read_text())
    assert doc["status"] == "completed"
    assert [r["round"] for r in doc["rounds"]] == list(range(rounds + 1))
    for r in doc["rounds"]:
        assert 0.0 <= r["ma"] <= 1.0 and 0.0 <= r["asr"] <= 1.0, r
    return doc["rounds"]


def tiny_server_dataset(path: Path) -> Path:
    """A server dataset in the digits format (8x8 grey): 50 clean images + their frequency variants."""
    import numpy as np

    from clipfed_strategy.freq_augment import augment_dataset
    from clipfed_strategy.server_dataset import ServerDataset
    from fltask.config import parse_run_config
    from fltask.datasets import load_task_data
    from server_app.inprocess import default_run_config

    data = load_task_data(parse_run_config(default_run_config()))
    rng = np.random.default_rng(0)
    n = 5 * data.num_classes
    clean = ServerDataset(images=rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8),
                          labels=np.arange(n) % data.num_classes, variants=np.zeros(n, dtype=np.int64),
                          source_index=np.arange(n), class_names=list(data.class_names))
    augment_dataset(clean, "hf-noise,hf-patch,lf-blend").save(path)
    return path


def clipfed_ready() -> str | None:
    try:
        from server_app.clipfed_setup import build_clipfed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not ready"
        return f"server_app.clipfed_setup.build_clipfed does not import yet: {exc!r}"
    return None


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("defense", ["fedavg", "clipfed"])
def test_loopback_deployment_completes(defense: str, app_dir: Path, tmp_path: Path,
                                       plain_federation: Federation) -> None:
    extra = ""
    if defense == "clipfed":
        if reason := clipfed_ready():
            pytest.xfail(reason)
        sds = tiny_server_dataset(tmp_path / "sds")
        extra = f'sds-path="{sds}" standin-epochs=2 distill-steps=2'
    fed, results, name = plain_federation, tmp_path / "results", f"loop-{defense}"
    run_id = fed.submit(app_dir, run_config(results, name, defense, extra=extra))
    rounds = assert_completed(fed, fed.wait_finished(run_id, results / name / "metrics.json"), results, name)
    for r in rounds[1:]:
        assert r["num_replies"] == NUM_NODES, r
        assert r["attackers"] == [ATTACKER], r
    if defense == "clipfed":
        assert all("num_rejected" in r for r in rounds[1:]), "CLIP-Fed reports its screening decisions every round"


def test_loopback_tls_with_supernode_auth(app_dir: Path, tmp_path: Path, federations: list[Federation]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: docker/gen-certs.sh needs it")
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    subprocess.run([str(ROOT / "docker" / "gen-certs.sh"), str(certs), str(NUM_NODES)], check=True, capture_output=True)
    subprocess.run([str(ROOT / "docker" / "gen-supernode-keys.sh"), str(keys), str(NUM_NODES + 1)], check=True,
                   capture_output=True, env={**os.environ, "PYTHON": sys.executable})
    fed = Federation(tmp_path, certs=certs, keys=keys)
    federations.append(fed)
    fed.start_superlink()
    fed.register_keys()                                   # supernode-0..2; supernode-3's key stays unregistered
    fed.start_serverapp_exec()
    fed.start_nodes()
    rogue = fed.start_node(0, keys / f"supernode-{NUM_NODES}", name="rogue-supernode", extra=("--max-retries", "0"))
    results = tmp_path / "results"
    run = fed.wait_finished(fed.submit(app_dir, run_config(results, "loop-tls")), results / "loop-tls" / "metrics.json")
    rounds = assert_completed(fed, run, results, "loop-tls")
    assert [r["num_replies"] for r in rounds[1:]] == [NUM_NODES, NUM_NODES]
    assert rogue.wait(timeout=60) != 0, "a SuperNode with an unregistered key must be refused"
    assert "Failed to activate SuperNode" in fed.log("rogue-supernode")
    assert not fed.stop(), "processes left running"


def test_loopback_run_survives_a_killed_supernode(app_dir: Path, tmp_path: Path,
                                                  federations: list[Federation]) -> None:
    """SIGKILL the attacker's SuperNode (and its SuperExec) while round 2 waits for it.

    To make the timing deterministic, the attacker's ClientApp SuperExec is frozen (SIGSTOP) as
    soon as its SuperNode has sent the round-1 reply; the node therefore never answers round 2. Once its SuperNode has received the round-2 message, both are killed. The
    SuperLink marks the node offline when two heartbeats are missed (Flower 1.42: interval 30 s,
    patience 2) and answers with an error reply; the round completes with the two other replies.
    """
    fed = Federation(tmp_path)
    federations.append(fed)
    fed.start_superlink()
    fed.start_serverapp_exec()
    fed.start_nodes()
    victim, victim_exec = f"supernode-{ATTACKER}", f"superexec-clientapp-{ATTACKER}"
    results = tmp_path / "results"
    run_id = fed.submit(app_dir, run_config(results, "loop-kill"))

    end = time.monotonic() + RUN_DEADLINE_S
    # freeze the attacker's SuperExec once its SuperNode has sent the round-1 reply: freezing it as
    # soon as it spawned the ClientApp could stall that ClientApp's hand-over and with it round 1
    # (seen once in CI); round 2 cannot start before the server has aggregated and evaluated round 1
    while fed.log(victim).count("Sending: train message") < 1:
        assert time.monotonic() < end, f"{victim} never sent its round-1 reply:\n{fed.tails()}"
        assert fed.procs[victim_exec].poll() is None, fed.tails()
        time.sleep(0.05)
    os.kill(fed.procs[victim_exec].pid, signal.SIGSTOP)   # no round-2 ClientApp
    while fed.log(victim).count("Receiving: train message") < 2:
        assert time.monotonic() < end, f"{victim} never received the round-2 message:\n{fed.tails()}"
        time.sleep(0.2)
    fed.kill(victim, victim_exec)
    assert not session_members({fed.procs[victim].pid, fed.procs[victim_exec].pid})

    rounds = assert_completed(fed, fed.wait_finished(run_id, results / "loop-kill" / "metrics.json"), results,
                              "loop-kill")
    assert rounds[1]["num_replies"] == NUM_NODES and rounds[1]["attackers"] == [ATTACKER], rounds[1]
    assert rounds[2]["attackers"] == [], f"the killed attacker must not contribute to round 2: {rounds[2]}"
    assert (rounds[2]["num_replies"], rounds[2]["num_failures"]) == (NUM_NODES - 1, 1), rounds[2]
    assert rounds[2]["train_loss"] is not None, "round 2 aggregates the replies it has"
    # the ServerApp waited for the SuperLink to declare the node offline (>= 36 s after the kill)
    assert rounds[2]["seconds_train"] > 20, rounds[2]
    assert not fed.stop(), "processes left running"
