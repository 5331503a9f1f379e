"""Integration: the real offline stand-in teacher (open_clip checkpoint path) drives the CLI build."""

import json

import numpy as np
import pytest
import torch

from clipfed_strategy import standin_teacher as st
from clipfed_strategy.server_dataset import ServerDataset
from clipfed_strategy.teacher import load_teacher
from data_synth.cli import main

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory, digits):
    """A small digits stand-in (300 images, 12 epochs: about 80 % zero-shot; fewer epochs leave classes unreachable) saved the way real weights are."""
    torch.set_num_threads(1)
    images, labels = digits
    out = tmp_path_factory.mktemp("standin")
    st.train_standin_teacher(images[:300], labels[:300], DIGITS, out, preset="digits", epochs=12, progress=False,
                             num_threads=1, device="cpu")
    return out


@pytest.mark.slow
def test_cli_build_with_standin_teacher(tmp_path, standin_dir, capsys):
    out = tmp_path / "sds"
    rc = main([
        "build", "--out", str(out), "--dataset-classes", "digits", "--resolution", "8", "--channels", "1",
        "--images-per-class", "2", "--faug-ops", "hf-noise,hf-patch", "--min-conf", "0.2", "--max-oversample", "4",
        "--standin", str(standin_dir), "--inv-steps", "60", "--inv-w-bn", "0.02", "--device", "cpu", "--no-progress",
    ])
    assert rc == 0, capsys.readouterr().err
    ds = ServerDataset.load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["is_standin"] is True
    assert manifest["teacher"]["identity"].startswith("open_clip:clipfed-standin-digits:")
    assert manifest["generator"]["name"] == "teacher-inversion" and manifest["generator"]["config"]["bn_prior"]
    assert ds.images.shape[1:] == (8, 8, 1) and ds.clean_mask().sum() == 20
    # the stand-in itself agrees with every kept clean image (the filter's promise)
    spec, _ = st.read_standin(standin_dir)
    teacher = load_teacher(spec, DIGITS, device="cpu")
    x, y = ds.to_tensors()[:2]
    clean = torch.from_numpy(ds.clean_mask())
    probs = teacher.zero_shot_logits(x[clean]).softmax(1)
    assert torch.equal(probs.argmax(1), y[clean])
    assert (probs.gather(1, y[clean][:, None]) >= 0.2 - 1e-4).all()
    assert np.all(ds.labels == ds.labels[ds.source_index])
