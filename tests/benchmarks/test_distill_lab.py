"""benchmarks.distill_lab: distil a run's checkpointed global model and measure MA/ASR after each."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from benchmarks.distill_lab import LabError, lab, main
from server_app.inprocess import run_inprocess


# LocalGrid sets Flower's process-global task identity: put it back after every test
pytestmark = pytest.mark.usefixtures("restore_task_identity")


@pytest.fixture(scope="module")
def backdoored_run(tmp_path_factory):
    """A 3-round FedAvg digits run under BadNets (its checkpoint) + a small held-out server set
    (tests only: real digits with hf-patch variants) and a 1-epoch stand-in teacher."""
    from clipfed_strategy.freq_augment import augment_dataset
    from clipfed_strategy.server_dataset import ServerDataset

    root = tmp_path_factory.mktemp("lab")
    d = load_digits()
    images = np.round(d.images[-100:] / 16.0 * 255).astype(np.uint8)[..., None]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    augment_dataset(ServerDataset(images, d.target[-100:], np.zeros(100), np.arange(100), names),
                    "hf-patch", seed=0).save(root / "sds")
    out = run_inprocess({"num-clients": 4, "num-server-rounds": 3, "local-epochs": 2, "max-train-per-client": 200,
                         "malicious-ids": "0,1", "results-dir": str(root / "runs"), "run-name": "fedavg",
                         "cache-dir": str(root / "cache")})
    return out / "checkpoint.pt", {"sds-path": str(root / "sds"), "standin-epochs": 1, "device": "cpu"}


def test_lab_reports_ma_and_asr_before_and_after_each_distillation(backdoored_run, tmp_path, capsys):
    ckpt, keys = backdoored_run
    run = json.loads((ckpt.parent / "metrics.json").read_text())
    result = lab(ckpt, {**keys, "distill-steps": 2}, rounds=2, eval_size=0)
    steps = result["steps"]
    assert [s["distillations"] for s in steps] == [0, 1, 2]
    # before any distillation: exactly the run's final evaluation (same model, same test set)
    assert steps[0]["ma"] == pytest.approx(run["rounds"][-1]["ma"]) and steps[0]["asr"] == pytest.approx(run["rounds"][-1]["asr"])
    assert steps[1]["losses"]["self"] >= 0 and steps[1]["seconds"] > 0
    assert (steps[1]["ma"], steps[1]["asr"]) != (steps[0]["ma"], steps[0]["asr"])  # the model did change
    assert result["server_rows"] == 200 and "STAND-IN" in result["teacher"]
    # the CLI prints one line and writes the same structure
    out = tmp_path / "lab.json"
    args = [str(ckpt), *(f"{k}={v}" for k, v in keys.items()), "distill-steps=2", "--rounds", "1", "--eval-size", "0",
            "--out", str(out)]
    assert main(args) == 0
    assert "0: MA" in capsys.readouterr().out and json.loads(out.read_text())["steps"][1]["distillations"] == 1


def test_lab_refuses_unknown_keys_and_missing_checkpoints(backdoored_run, tmp_path):
    ckpt, keys = backdoored_run
    with pytest.raises(LabError, match="unknown run-config key"):
        lab(ckpt, {"distill-lamda-self": 1})
    with pytest.raises(LabError, match="no checkpoint"):
        lab(tmp_path / "checkpoint.pt")
    assert main([str(tmp_path / "checkpoint.pt")]) == 2


def test_lab_accepts_keys_added_after_the_run_was_recorded(backdoored_run, tmp_path):
    """An older run's metrics.json lacks today's keys: they take today's defaults and can be overridden."""
    import shutil

    ckpt, keys = backdoored_run
    old = tmp_path / "old"
    shutil.copytree(ckpt.parent, old)
    metrics = json.loads((old / "metrics.json").read_text())
    for key in ("distill-grad-clip", "invert-enabled"):
        metrics["config"].pop(key, None)
    (old / "metrics.json").write_text(json.dumps(metrics))
    result = lab(old / "checkpoint.pt", {**keys, "distill-steps": 1, "distill-grad-clip": 5.0}, rounds=1, eval_size=0)
    assert result["overrides"]["distill-grad-clip"] == 5.0 and len(result["steps"]) == 2
