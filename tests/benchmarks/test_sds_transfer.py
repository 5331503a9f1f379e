"""benchmarks.sds_transfer: KD students tell a server set that carries class knowledge from one that does not."""

import json

import numpy as np
import pytest

from benchmarks.sds_transfer import main, transfer
from clipfed_strategy.server_dataset import ServerDataset
from fltask.config import parse_run_config
from fltask.datasets import load_task_data
from fltask.partition import make_split
from server_app.inprocess import default_run_config

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def server_sets(tmp_path_factory):
    """Two digits server sets with the same labels (tests only): real training images of the client pool,
    and uniform noise. Plus the run-config keys of a small cached stand-in teacher."""
    root = tmp_path_factory.mktemp("transfer")
    cfg = parse_run_config(default_run_config())
    data = load_task_data(cfg)
    pool = make_split(cfg, data).pool[:300]
    x, y = data.x_train[pool], data.y_train[pool]
    noise = np.random.default_rng(0).integers(0, 256, size=x.shape, dtype=np.uint8)
    for name, images in (("real", x), ("noise", noise)):
        ServerDataset(images, y, np.zeros(len(y)), np.arange(len(y)), NAMES).save(root / name)
    keys = {"standin-epochs": 40, "cache-dir": str(root / "cache"), "device": "cpu"}
    return root, keys


def test_real_rows_transfer_the_teachers_knowledge_and_noise_does_not(server_sets, tmp_path, capsys):
    root, keys = server_sets
    real = transfer({**keys, "sds-path": str(root / "real")}, steps=150, eval_size=0)
    noise = transfer({**keys, "sds-path": str(root / "noise")}, steps=150, eval_size=0)
    assert real["teacher_is_standin"] and noise["teacher"] == real["teacher"]
    assert real["teacher_test_accuracy"] > 0.8, real["teacher_test_accuracy"]
    acc = {name: r["students"]["server set, clean rows"]["test_accuracy"] for name, r in (("real", real), ("noise", noise))}
    assert acc["real"] > 0.6, acc  # measured 0.89 (teacher 0.97)
    assert acc["noise"] < 0.35, acc  # measured 0.14
    # the real-image reference does not depend on the server set
    ref = real["students"]["real held-out, as many as clean rows"]
    assert ref["images"] == 300 and ref["test_accuracy"] == noise["students"]["real held-out, as many as clean rows"]["test_accuracy"]
    assert noise["clean_rows_vs_real"] < real["clean_rows_vs_real"]
    out = tmp_path / "t.json"
    args = [*(f"{k}={v}" for k, v in {**keys, "sds-path": str(root / "real")}.items()), "--steps", "20",
            "--eval-size", "100", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "STAND-IN teacher (NOT CLIP)" in printed and "server set, clean rows" in printed
    assert json.loads(out.read_text())["eval_size"] == 100


def test_unknown_keys_are_refused(capsys):
    assert main(["sds-pth=/x"]) == 2
    assert "sds-path" in capsys.readouterr().err
