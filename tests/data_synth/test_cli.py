"""``python -m data_synth build|inspect`` through ``data_synth.cli.main``."""

import json

import numpy as np
from PIL import Image

from data_synth.cli import main


def _folder(root, classes=("zero", "one"), n=4):
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_build_then_inspect(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "sds"
    rc = main([
        "build", "--out", str(out), "--generator", "folder", "--folder", str(root), "--dataset-classes", "zero,one",
        "--resolution", "8", "--channels", "1", "--images-per-class", "3", "--faug-ops", "hf-patch,lf-blend",
        "--faug-copies", "2", "--faug-param", "blend-max=0.3", "--no-filter", "--no-progress",
    ])
    assert rc == 0
    assert "(30 images, 6 clean" in capsys.readouterr().out  # per class: 3 clean + 2 ops x 2 copies x 3
    assert json.loads((out / "manifest.json").read_text())["faug"]["params"]["blend_max"] == 0.3
    rc = main(["inspect", str(out), "--sheet-dir", str(tmp_path / "sheets")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "generator   : folder" in text and "teacher     : none" in text
    lines = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines() if ln.startswith(("zero ", "one ", "total "))}
    assert lines["zero"] == ["3", "6", "6", "15"] and lines["total"] == ["6", "12", "12", "30"]
    sheets = sorted((tmp_path / "sheets").glob("*.png"))
    assert [p.name for p in sheets] == ["00-zero.png", "01-one.png"]
    with Image.open(sheets[0]) as im:
        assert im.size[1] > 3 * 48  # one row per variant


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    out = tmp_path / "sds"
    rc = main(["build", "--out", str(out), "--dataset-classes", "imagenet", "--no-progress"])
    assert rc == 2 and "not a known class list (digits, cifar10)" in capsys.readouterr().err
    rc = main(["build", "--out", str(out), "--dataset-classes", "digits", "--faug-ops", "hf-noise,wavelet"])
    assert rc == 2 and "allowed: hf-noise, hf-patch, lf-blend, wb-blend, fft-amp" in capsys.readouterr().err
    rc = main(["build", "--out", str(out), "--dataset-classes", "a,b", "--generator", "folder",
               "--folder", str(tmp_path / "missing"), "--no-filter"])
    assert rc == 2 and "is not a directory" in capsys.readouterr().err
    rc = main(["build", "--out", str(out), "--dataset-classes", "digits", "--standin", str(tmp_path)])
    assert rc == 2 and "holds no finished stand-in" in capsys.readouterr().err
    rc = main(["build", "--out", str(out), "--dataset-classes", "digits", "--faug-param", "eps-max"])
    assert rc == 2 and "expects KEY=VALUE" in capsys.readouterr().err
    rc = main(["inspect", str(out)])
    assert rc == 2 and "manifest.json is missing" in capsys.readouterr().err
    assert not out.exists()
