"""End-to-end smoke test: the real ``flwr run`` (local SuperLink, Ray simulation), 4 clients, 2 rounds.

``flwr run`` exits 0 even when the ServerApp crashes, so the test checks the run's status through
``flwr ls`` and reads MA and ASR from metrics.json. Every process the test started is stopped by PID
(see ``tests/e2e_helpers.py``), and ``ps`` must show nothing of it afterwards.
"""

import json
import sys

import pytest

from e2e_helpers import PROJECT_ROOT, FlwrSession, processes_mentioning

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process teardown reads /proc")

ROUNDS = 2


@pytest.fixture
def session(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    s = FlwrSession(home)
    yield s
    survivors = s.stop()
    leftovers = processes_mentioning(f"127.0.0.1:{s.port}") + processes_mentioning(f"--port {s.port}")
    assert not survivors and not leftovers, f"processes left running: {survivors} {leftovers}"


def test_flwr_run_simulation_completes_with_ma_and_asr(session, results_dir):
    run_config = (f'num-clients=4 num-server-rounds={ROUNDS} results-dir="{results_dir}" '
                  'malicious-ids="0" run-name="e2e"')
    run_id = session.run_app(PROJECT_ROOT, "num-supernodes=4", run_config)
    assert session.pids(), "no SuperLink process was started for this session"

    run = session.wait_finished(run_id, timeout=420)
    assert run["status"] == "finished:completed", (
        f"run {run_id}: {run['status']} ({run.get('status-details')})\n{session.superlink_log()[-4000:]}"
    )

    doc = json.loads((results_dir / "e2e" / "metrics.json").read_text())
    assert doc["status"] == "completed"
    assert doc["config"]["num-clients"] == 4 and doc["config"]["malicious-ids"] == "0"
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for r in rounds:
        assert 0.0 <= r["ma"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
    assert all(r["attackers"] == [0] for r in rounds[1:])  # the attacker really ran in the simulation
    assert (results_dir / "e2e" / "metrics.csv").exists() and (results_dir / "e2e" / "curves.png").exists()
