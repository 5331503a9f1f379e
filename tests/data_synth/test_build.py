"""The builder: filtering, balancing, manifest, reuse, resume, bad inputs."""

import json

import numpy as np
import torch
import pytest

from clipfed_strategy.freq_augment import FreqAugError
from clipfed_strategy.server_dataset import ServerDataset
from data_synth import SynthError, build_server_dataset, resolve_class_names
from data_synth.workdir import work_dir_for

DIGITS = resolve_class_names("digits")


def _build(out, teacher, gen, **kw):
    args = dict(images_per_class=6, faug_ops="hf-noise,hf-patch", faug_copies=1, min_conf=0.3, seed=0, device="cpu", progress=False)
    args.update(kw)
    return build_server_dataset(out, teacher, DIGITS, 8, 1, generator=gen, **args)


def test_filter_drops_off_class_images(tmp_path, oracle_teacher, digits_by_class, list_generator_cls):
    # class 0's stream starts with ten real ones mislabelled as "zero", then real zeros
    per_class = {c: digits_by_class[c][:20] for c in range(10)}
    per_class[0] = np.concatenate([digits_by_class[1][20:30], digits_by_class[0][:20]])
    gen = list_generator_cls(per_class)
    ds = _build(tmp_path / "sds", oracle_teacher, gen, images_per_class=8, chunk_size=20, max_oversample=2.5)
    clean = ds.clean_mask()
    assert np.bincount(ds.labels[clean], minlength=10).tolist() == [8] * 10  # balanced
    # the teacher agrees with every kept clean image, and none of the mislabelled ones survived
    x = ds.to_tensors()[0][clean]
    assert (oracle_teacher.zero_shot_logits(x).argmax(1).numpy() == ds.labels[clean]).all()
    zeros = ds.images[clean & (ds.labels == 0)]
    ones = per_class[0][:10]
    assert not any((img == ones).all(axis=(1, 2, 3)).any() for img in zeros)
    filt = ds.meta["filter"]
    # chunk 0 asked for 8 (all mislabelled), the top-up chunk for the rest of the 2.5 x 8 budget
    assert filt["per_class"]["zero"]["generated"] == 20 and filt["per_class"]["zero"]["kept_share"] <= 0.5
    assert filt["per_class"]["one"]["generated"] < 20


def test_manifest_round_trip_and_reuse(tmp_path, oracle_teacher, digits_by_class, list_generator_cls):
    gen = list_generator_cls({c: digits_by_class[c][:10] for c in range(10)})
    out = tmp_path / "sds"
    ds = _build(out, oracle_teacher, gen)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["content_hash"] == ds.content_hash()
    assert manifest["generator"]["name"] == "list" and manifest["generator"]["provenance"] == "test arrays"
    assert manifest["teacher"] == {"identity": "fake:oracle-digits", "is_standin": True}
    assert manifest["variants"] == ["clean", "hf-noise", "hf-patch"]
    assert manifest["filter"]["min_conf"] == 0.3 and "per_class" in manifest["filter"]
    loaded = ServerDataset.load(out)
    assert loaded.content_hash() == ds.content_hash()
    assert not work_dir_for(out).exists()
    # same config + teacher: reused without generating; other config: rebuilt
    calls = len(gen.calls)
    again = _build(out, oracle_teacher, gen)
    assert len(gen.calls) == calls and again.content_hash() == ds.content_hash()
    # another augmentation only: the clean images are re-augmented, nothing is generated again
    reaug = _build(out, oracle_teacher, gen, faug_ops="lf-blend,wb-blend")
    assert len(gen.calls) == calls
    assert ServerDataset.load(out).variant_names == ["clean", "lf-blend", "wb-blend"]
    assert np.array_equal(reaug.images[reaug.clean_mask()], ds.images[ds.clean_mask()])
    assert reaug.meta["build"]["reused_clean_images"] and reaug.meta["build_config"]["faug"]["ops"] == ["lf-blend", "wb-blend"]
    # ... also from a sibling directory (the ServerApp keeps one directory per config)
    sibling = _build(tmp_path / "other", oracle_teacher, gen, faug_ops="hf-noise")
    assert len(gen.calls) == calls and np.array_equal(sibling.images[sibling.clean_mask()], ds.images[ds.clean_mask()])
    # anything else (here the confidence threshold) generates again
    _build(out, oracle_teacher, gen, min_conf=0.31)
    assert len(gen.calls) > calls


def test_resume_reuses_finished_chunks(tmp_path, oracle_teacher, digits_by_class, list_generator_cls):
    per_class = {c: digits_by_class[c][:30] for c in range(10)}
    kw = dict(images_per_class=12, chunk_size=4, min_conf=0.0, max_oversample=1.0)
    # (in a directory of its own: a finished sibling with the same config would lend its images)
    ref = _build(tmp_path / "elsewhere" / "ref", oracle_teacher, list_generator_cls(per_class), **kw)

    out = tmp_path / "sds"
    crashing = list_generator_cls(per_class, fail_on_chunk=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(out, oracle_teacher, crashing, **kw)
    assert not (out / "manifest.json").exists()  # nothing that looks complete
    assert len(list(work_dir_for(out).glob("chunk-*.npz"))) == 20  # chunks 0 and 1, 10 classes each

    resumed = list_generator_cls(per_class)
    ds = _build(out, oracle_teacher, resumed, **kw)
    assert [(c, len(reqs)) for c, reqs in resumed.calls] == [(2, 10)]  # only chunk 2 was generated
    assert ds.content_hash() == ref.content_hash()
    assert not work_dir_for(out).exists()


def test_bad_inputs_stop_clearly(tmp_path, oracle_teacher, digits_by_class, list_generator_cls):
    gen = list_generator_cls({c: digits_by_class[c][:5] for c in range(10)})
    out = tmp_path / "sds"
    with pytest.raises(SynthError, match="not a known class list"):
        resolve_class_names("imagenet")
    with pytest.raises(FreqAugError, match="allowed: hf-noise, hf-patch, lf-blend, wb-blend, fft-amp"):
        _build(out, oracle_teacher, gen, faug_ops="hf-noise,blur")
    with pytest.raises(SynthError, match="unknown generator 'diffusion'"):
        _build(out, oracle_teacher, "diffusion")
    with pytest.raises(SynthError, match="kept no image of class"):
        _build(out, oracle_teacher, gen, min_conf=1.0)
    assert not out.exists()
    assert gen.calls  # the last one did run the generator, then refused to save
    assert resolve_class_names("a, b ,c") == ["a", "b", "c"]
    assert resolve_class_names("cifar10")[0] == "airplane"


def test_teacher_inversion_end_to_end(tmp_path, oracle_teacher):
    opts = {"steps": 60, "batch_size": 64}
    ds = _build(tmp_path / "inv", oracle_teacher, "teacher-inversion", images_per_class=3, generator_options=opts, faug_ops="fft-amp")
    clean = ds.clean_mask()
    assert ds.images.shape[1:] == (8, 8, 1) and clean.sum() == 30
    assert (oracle_teacher.zero_shot_logits(ds.to_tensors()[0][clean]).argmax(1).numpy() == ds.labels[clean]).all()
    assert ds.meta["generator"]["name"] == "teacher-inversion" and ds.meta["generator"]["config"]["steps"] == 60
    assert ds.meta["filter"]["teacher_top1"] > 0.8
    again = _build(tmp_path / "inv2", oracle_teacher, "teacher-inversion", images_per_class=3, generator_options=opts, faug_ops="fft-amp")
    assert again.content_hash() == ds.content_hash()  # seeded
    with pytest.raises(SynthError, match="unknown option"):
        _build(tmp_path / "inv3", oracle_teacher, "teacher-inversion", generator_options={"stepz": 3})


def test_inversion_bn_prior_weight_defaults_by_channels(oracle_teacher):
    """The BatchNorm-prior weight defaults to 0.1 for grey images and 0.01 for colour (on the
    CIFAR-10 stand-in 0.1 overpowered the class objective); an explicit value wins."""
    from data_synth.generators import GenContext, make_generator
    from data_synth.generators.inversion import default_w_bn

    assert (default_w_bn(1), default_w_bn(3)) == (0.1, 0.01)
    names = list(oracle_teacher.class_names)
    grey = make_generator("teacher-inversion", GenContext(names, (8, 8), 1, torch.device("cpu"), oracle_teacher, False))
    colour = make_generator("teacher-inversion", GenContext(names, (8, 8), 3, torch.device("cpu"), oracle_teacher, False))
    fixed = make_generator("teacher-inversion", GenContext(names, (8, 8), 3, torch.device("cpu"), oracle_teacher, False),
                           {"w_bn": 0.2})
    assert [g.describe()["config"]["w_bn"] for g in (grey, colour, fixed)] == [0.1, 0.01, 0.2]


def test_random_resized_crop_by_hand():
    """Side 1 at the centre is the identity. On a horizontal ramp (pixel value = column), a crop of side 1/2
    samples columns 1.75, 2.25, ..., 5.25 (pixel centres, align_corners=False), linearly interpolated; shifted
    by 0.5 in normalised x it samples 2 columns further right, clamped at the border."""
    from data_synth.generators.inversion import random_resized_crop

    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(random_resized_crop(x, torch.ones(2), torch.zeros(2, 2)), x)
    ramp = torch.arange(8.0).expand(1, 1, 8, 8).clone()
    out = random_resized_crop(ramp, torch.tensor([0.5]), torch.zeros(1, 2))
    torch.testing.assert_close(out[0, 0], (1.75 + 0.5 * torch.arange(8.0)).expand(8, 8))
    right = random_resized_crop(ramp, torch.tensor([0.5]), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(right[0, 0], (3.75 + 0.5 * torch.arange(8.0)).clamp(max=7.0).expand(8, 8))


def test_inversion_crop_setting_is_checked_and_recorded(tmp_path, oracle_teacher):
    with pytest.raises(SynthError, match="crop_min"):
        _build(tmp_path / "bad", oracle_teacher, "teacher-inversion", generator_options={"crop_min": 0.0})
    ds = _build(tmp_path / "crop", oracle_teacher, "teacher-inversion", images_per_class=2,
                generator_options={"steps": 40, "batch_size": 64, "crop_min": 0.6}, faug_ops="fft-amp")
    assert ds.meta["generator"]["config"]["crop_min"] == 0.6
    clean = ds.clean_mask()
    assert (oracle_teacher.zero_shot_logits(ds.to_tensors()[0][clean]).argmax(1).numpy() == ds.labels[clean]).mean() >= 0.8
