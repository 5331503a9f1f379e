"""The real ServerApp + ClientApp in-process (LocalGrid): results files, per-round MA/ASR, failing nodes."""

import csv
import json

import pytest
from flwr.app import Context, RecordDict

from fltask.config import ConfigError, parse_run_config
from fltask.results import CSV_FIELDS
from server_app.app import app as server_app
from server_app.inprocess import LocalGrid, default_run_config, run_inprocess

ROUNDS = 2
SMALL = {"num-clients": 4, "num-server-rounds": ROUNDS, "local-epochs": 1, "max-train-per-client": 60,
         "malicious-ids": "0"}


# LocalGrid sets Flower's process-global task identity: put it back after every test
pytestmark = pytest.mark.usefixtures("restore_task_identity")


def _load(out):
    return json.loads((out / "metrics.json").read_text())


def test_inprocess_federation_writes_all_results(results_dir):
    # full digits partitions and 2 local epochs: enough for the global model to learn in 2 rounds
    overrides = {**SMALL, "local-epochs": 2, "max-train-per-client": 0, "results-dir": str(results_dir),
                 "run-name": "tiny"}
    out = run_inprocess(overrides)
    assert out == results_dir / "tiny"
    for name in ("metrics.json", "metrics.csv", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = _load(out)
    assert doc["status"] == "completed"
    resolved = parse_run_config({**default_run_config(), **overrides}).to_dict()
    assert doc["config"] == json.loads(json.dumps(resolved))  # the full resolved config
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for r in rounds:
        assert 0.0 <= r["ma"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["clean_target_rate"] <= 1.0
    for r in rounds[1:]:
        assert r["num_replies"] == 4
        assert r["attackers"] == [0]  # ground truth reached the metrics code
        assert r["train_loss"] > 0 and r["seconds_train"] >= 0
    assert rounds[0]["ma"] < 0.2 and rounds[-1]["ma"] > 0.5  # the federation learns the task

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    assert all(float(r["ma"]) == pytest.approx(j["ma"]) for r, j in zip(rows, rounds))


def test_federation_completes_when_a_node_fails(results_dir):
    out = run_inprocess({**SMALL, "results-dir": str(results_dir), "run-name": "failing"}, fail_nodes=[1002])
    doc = _load(out)
    assert doc["status"] == "completed"
    assert [r["round"] for r in doc["rounds"]] == list(range(ROUNDS + 1))
    assert all("ma" in r and "asr" in r for r in doc["rounds"])
    for r in doc["rounds"][1:]:
        assert r["attackers"] == [0]


@pytest.mark.parametrize("defense", ["median", "krum"])
def test_robust_aggregators_run(results_dir, defense):
    out = run_inprocess({**SMALL, "num-server-rounds": 1, "defense": defense, "results-dir": str(results_dir)})
    assert [r["round"] for r in _load(out)["rounds"]] == [0, 1]


def test_bad_config_fails_before_anything_runs(results_dir):
    rc = {**default_run_config(), **SMALL, "results-dir": str(results_dir), "dataset": "mnist"}
    from client_app.app import app as client_app

    grid = LocalGrid(client_app, 4, rc)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
    with pytest.raises(ConfigError, match="'dataset'.*digits, cifar10, cifar10-lt"):
        server_app(grid, ctx)
    assert list(results_dir.iterdir()) == []  # no half-written results


def test_inprocess_command_line(results_dir, capsys):
    from server_app.inprocess import main

    args = [f"{k}={v}" for k, v in SMALL.items() if k != "malicious-ids"]
    rc = main(args + ['malicious-ids="0"', "num-server-rounds=1", f"results-dir={results_dir}", "run-name=cli",
                      "attack=none"])
    out = capsys.readouterr().out
    assert rc == 0 and (results_dir / "cli" / "metrics.json").exists()
    metrics = _load(results_dir / "cli")
    assert metrics["config"]["attack"] == "none" and metrics["config"]["num-server-rounds"] == 1
    assert "results in" in out and len([ln for ln in out.splitlines() if ln.strip().startswith("1 ")]) == 1
    assert main(["num-clients"]) == 2 and "key=value" in capsys.readouterr().err
    # a misspelt key is refused before anything runs (it would otherwise be silently ignored)
    assert main(["out-dir=x"]) == 2
    err = capsys.readouterr().err
    assert "unknown run-config key 'out-dir'" in err and "results-dir" in err
