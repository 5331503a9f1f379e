"""The offline stand-in teacher: training maths, saving/reloading through the checkpoint path,
reuse from cache, CLI. Trains on sklearn digits only (small, a few epochs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clipfed_strategy import standin_teacher as st
from clipfed_strategy.teacher import STANDIN_LABEL, TeacherSpec, load_teacher, uint8_to_tensor

torch.set_num_threads(1)
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_N, EPOCHS = 300, 10


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    order = np.random.default_rng(5).permutation(len(x))
    return x[order], d.target[order].astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One stand-in trained on 300 digits through load_or_train_standin (the cached path)."""
    x, y = _digits()
    cache = tmp_path_factory.mktemp("standin-cache")
    spec = st.load_or_train_standin(
        x[:TRAIN_N], y[:TRAIN_N], DIGITS, cache, "digits", epochs=EPOCHS, progress=False, num_threads=1, device="cpu"
    )
    return spec, cache, x, y


# ------------------------------------------------------------------------------ maths
def test_multi_positive_loss_matches_definition():
    sim = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 3.0, 1.0]])
    pos = torch.tensor([[True, True, False, False], [False, False, True, True]])
    img = [-math.log((math.exp(2) + math.exp(1)) / sum(math.exp(v) for v in (2, 1, 0, -1))),
           -math.log((math.exp(3) + math.exp(1)) / sum(math.exp(v) for v in (0.5, 0, 3, 1)))]
    col = sim.T  # each caption column has exactly one positive image here
    txt = [-(col[j][pos.T[j]].item() - torch.logsumexp(col[j], 0).item()) for j in range(4)]
    expected = (np.mean(img) + np.mean(txt)) / 2
    assert st.multi_positive_clip_loss(sim, pos).item() == pytest.approx(expected, rel=1e-5)
    # captions with no positive image in the batch are skipped, not NaN
    pos2 = torch.tensor([[True, True, False, False], [True, True, False, False]])
    assert torch.isfinite(st.multi_positive_clip_loss(sim, pos2))
    # perfectly separated classes -> loss near its floor; swapped labels -> much larger
    big = torch.tensor([[50.0, 50.0, 0.0, 0.0], [0.0, 0.0, 50.0, 50.0]])
    assert st.multi_positive_clip_loss(big, pos).item() < st.multi_positive_clip_loss(big, ~pos).item() - 10


def test_random_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(st.random_crop_flip(x, 0, False, g), x)
    y = st.random_crop_flip(x, 2, False, g)
    assert y.shape == x.shape
    for i in range(5):  # each output is a shifted window of the zero-padded input
        xp = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(y[i], xp[:, a : a + 8, b : b + 8]) for a in range(5) for b in range(5))
    flipped = st.random_crop_flip(x.repeat(20, 1, 1, 1), 0, True, g)
    n_flipped = sum(torch.equal(flipped[i], x[i % 5].flip(-1)) for i in range(100))
    assert 20 < n_flipped < 80


def test_stratified_holdout_is_disjoint_and_per_class():
    y = np.repeat(np.arange(4), [10, 20, 2, 30])
    tr, he = st.stratified_holdout(y, 0.1, seed=0)
    assert len(np.intersect1d(tr, he)) == 0 and len(tr) + len(he) == len(y)
    assert [int(np.sum(y[he] == c)) for c in range(4)] == [1, 2, 1, 3]


def test_presets_and_model_config(tmp_path):
    import open_clip

    cfg = st.PRESETS["cifar10"].model_config()
    assert cfg["vision_cfg"]["layers"] == [1, 1, 1, 1] and cfg["vision_cfg"]["width"] == 48
    assert cfg["embed_dim"] == 128 and cfg["text_cfg"]["vocab_size"] == 49408
    path = st.write_model_config("digits", tmp_path)
    assert path.name == "clipfed-standin-digits.json"
    assert open_clip.get_model_config("clipfed-standin-digits") == st.PRESETS["digits"].model_config()
    with pytest.raises(st.StandinError, match="digits, cifar10"):
        st.get_preset("imagenet")
    for t in st.TRAIN_TEMPLATES:
        assert "{c}" in t and "number" not in t and "digit" not in t


# ------------------------------------------------------------------------------ training
def test_standin_beats_chance_through_the_checkpoint_path(trained):
    spec, cache, x, y = trained
    assert spec.is_standin and spec.backend == "open_clip" and spec.model == "clipfed-standin-digits"
    assert spec.pretrained.endswith("standin.pt")
    info = json.loads((cache.glob("standin-digits-*/standin.json").__next__()).read_text())
    assert info["label"] == STANDIN_LABEL and info["epochs"] == EPOCHS
    assert info["training_set_size"] == TRAIN_N and info["heldout_size"] == 30
    assert info["training_set_hash"] == st.training_set_hash(x[:TRAIN_N], y[:TRAIN_N], DIGITS)
    # as a ServerApp would: only the two run-config strings, stand-in status detected from standin.json
    flat = TeacherSpec.from_strings(model=spec.model, pretrained=spec.pretrained)
    teacher = load_teacher(flat, DIGITS, device="cpu")
    assert teacher.is_standin and "clipfed-standin-digits" in teacher.identity
    test_x, test_y = x[-400:], y[-400:]
    acc = float(np.mean(teacher.predict(uint8_to_tensor(test_x)).numpy() == test_y))
    assert acc >= 0.6, f"stand-in zero-shot accuracy {acc:.3f} on held-out digits"


def test_cached_standin_is_reused(trained, monkeypatch):
    spec, cache, x, y = trained

    def boom(*a, **k):
        raise AssertionError("should have reused the cached stand-in")

    monkeypatch.setattr(st, "train_standin_teacher", boom)
    again = st.load_or_train_standin(x[:TRAIN_N], y[:TRAIN_N], DIGITS, cache, "digits", epochs=EPOCHS)
    assert again == spec
    with pytest.raises(AssertionError, match="reused"):  # other epochs -> trains a new one
        st.load_or_train_standin(x[:TRAIN_N], y[:TRAIN_N], DIGITS, cache, "digits", epochs=EPOCHS + 1)


def test_cli_trains_a_slice_then_reuses_it(tmp_path, capsys, monkeypatch):
    x, y = _digits()
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x[:200], y_train=y[:200], class_names=np.array(DIGITS))
    out = tmp_path / "standin"
    args = ["--npz", str(npz), "--out", str(out), "--preset", "digits", "--start", "100", "--count", "60",
            "--epochs", "1", "--threads", "1", "--device", "cpu"]
    assert st.main(args) == 0
    printed = capsys.readouterr().out
    assert f'clip-pretrained = "{out / "standin.pt"}"' in printed and "STAND-IN" in printed
    info = json.loads((out / "standin.json").read_text())
    assert info["training_set_size"] == 60
    assert info["training_set_hash"] == st.training_set_hash(x[100:160], y[100:160], DIGITS)
    monkeypatch.setattr(st, "train_standin_teacher", lambda *a, **k: pytest.fail("retrained"))
    assert st.main(args) == 0
