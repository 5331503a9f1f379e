"""The ``folder`` generator: user images, one sub-folder per class; clear errors on bad folders."""

import numpy as np
import pytest
from PIL import Image

from data_synth import SynthError, build_server_dataset
from data_synth.generators import GenContext, Request, make_generator

CLASSES = ["cat", "dog"]


def _write_pngs(root, per_class=3, size=(20, 16)):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            arr[..., c] = 255  # cats are red-ish, dogs green-ish
            Image.fromarray(arr).save(d / f"img{i}.png")
    return root


def test_folder_loads_resizes_and_builds(tmp_path):
    root = _write_pngs(tmp_path / "imgs")
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    gen = make_generator("folder", GenContext(CLASSES, (8, 8), 3), {"root": str(root)})
    out = gen.generate([Request(0, 1, 2), Request(1, 0, 3)], chunk=0, seed=0)
    assert out[0].shape == (2, 8, 8, 3) and out[1].shape == (3, 8, 8, 3) and out[0].dtype == np.uint8
    assert out[0][..., 0].min() == 255 and out[1][..., 1].min() == 255
    assert gen.capacity(0) == 3
    ds = build_server_dataset(
        tmp_path / "sds", None, CLASSES, 8, 1, generator="folder", generator_options={"root": str(root)},
        images_per_class=5, faug_ops="", filter=False, progress=False,
    )
    assert ds.images.shape == (6, 8, 8, 1)  # capped by the 3 files per class
    assert ds.meta["generator"]["name"] == "folder" and ds.meta["teacher"]["identity"] == "none"


def test_folder_errors_name_the_problem(tmp_path):
    root = _write_pngs(tmp_path / "imgs")
    ctx = GenContext(CLASSES, (8, 8), 3)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    gen = make_generator("folder", ctx, {"root": str(root)})
    with pytest.raises(SynthError, match="broken.png"):
        gen.generate([Request(1, 0, 4)], 0, 0)
    # the builder leaves nothing that looks complete behind
    out = tmp_path / "sds"
    with pytest.raises(SynthError, match="broken.png"):
        build_server_dataset(out, None, CLASSES, 8, 3, generator="folder", generator_options={"root": str(root)},
                             images_per_class=4, faug_ops="", filter=False, progress=False)
    assert not (out / "manifest.json").exists()

    for f in (root / "cat").iterdir():
        f.unlink()
    with pytest.raises(SynthError, match="hold no images.*cat"):
        make_generator("folder", ctx, {"root": str(root)})
    with pytest.raises(SynthError, match=r"no sub-folder for class\(es\) \['bird'\]"):
        make_generator("folder", GenContext(["cat", "bird"], (8, 8), 3), {"root": str(root)})
    with pytest.raises(SynthError, match="is not a directory"):
        make_generator("folder", ctx, {"root": str(tmp_path / "nowhere")})
    with pytest.raises(SynthError, match="needs --folder"):
        make_generator("folder", ctx, {})
