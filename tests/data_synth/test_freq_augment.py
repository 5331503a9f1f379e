"""Frequency-domain augmentation: each family touches the DCT band / region it claims to."""

import numpy as np
import pytest
import torch

from clipfed_strategy.freq_augment import (
    OPS,
    FreqAugConfig,
    FreqAugError,
    augment,
    augment_dataset,
    band_energy,
    dct2,
    fft_amp,
    hf_noise,
    hf_patch,
    idct2,
    lf_blend,
    to_float_nchw,
    wb_blend,
)
from clipfed_strategy.server_dataset import ServerDataset

CFG = FreqAugConfig()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def x_digits(digits):
    return to_float_nchw(digits[0][:64]).double()


def test_dct_is_orthonormal_and_invertible():
    x = torch.rand(4, 3, 8, 6, dtype=torch.float64)
    coef = dct2(x)
    assert torch.allclose(idct2(coef), x, atol=1e-12)
    assert torch.allclose(coef.pow(2).sum(), x.pow(2).sum())  # Parseval
    # a constant image has only a DC coefficient
    c = dct2(torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64))
    assert abs(c[0, 0, 0, 0].item() - 4.0) < 1e-12 and c.abs().sum().item() == pytest.approx(4.0)


def test_hf_noise_leaves_low_band_alone(x_digits):
    x = 0.2 + 0.6 * x_digits  # keep away from 0/1 so clamping cannot leak energy across bands
    out = hf_noise(x, CFG, _gen())
    diff = out - x
    lo = band_energy(diff, 0.0, CFG.rho_hi - 1e-6)
    hi = band_energy(diff, CFG.rho_hi, 1.0)
    assert (lo < 1e-9 * hi).all()  # float32 noise: round-off only
    assert (hi > 1e-4).all()
    peak = diff.flatten(1).abs().max(1).values
    assert (peak >= CFG.eps_min - 1e-9).all() and (peak <= CFG.eps_max + 1e-9).all()


def test_lf_blend_adds_only_low_band_content(x_digits):
    out = lf_blend(x_digits, CFG, _gen())
    # high band is the input's, scaled by (1 - a) with a in [blend_min, blend_max]
    ratio = band_energy(out, CFG.rho_lo + 1e-6, 1.0) / band_energy(x_digits, CFG.rho_lo + 1e-6, 1.0)
    assert (ratio >= (1 - CFG.blend_max) ** 2 - 1e-9).all() and (ratio <= (1 - CFG.blend_min) ** 2 + 1e-9).all()
    # the overlay itself sits in the low band: out - (1-a) x has no energy above rho_lo
    a = 1 - ratio.sqrt()
    overlay = out - (1 - a.view(-1, 1, 1, 1)) * x_digits
    lo, hi = band_energy(overlay, 0.0, CFG.rho_lo), band_energy(overlay, CFG.rho_lo + 1e-6, 1.0)
    assert (lo > 1e-4).all() and (hi < 1e-8 * lo).all()  # float32 draws: round-off only


def test_wb_blend_spreads_energy_over_every_band(x_digits):
    x = 0.2 + 0.6 * x_digits
    out = wb_blend(x, CFG, _gen())
    # out = (1 - a) x + a u, so out - (1 - a) x = a u is white noise: energy in the low, middle and high bands
    # in proportion to their number of coefficients (a flat spectrum), unlike hf-noise / lf-blend
    diff = out - x
    bands = [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]
    energy = torch.stack([band_energy(diff, lo, hi - 1e-9 if hi < 1 else hi) for lo, hi in bands], dim=1)
    assert (energy > 1e-3).all()
    u = torch.rand(4096, 1, 8, 8, generator=_gen(1), dtype=torch.float64) - 0.5
    share = torch.stack([band_energy(u, lo, hi - 1e-9 if hi < 1 else hi) for lo, hi in bands], dim=1).mean(0)
    flat = share / share.sum()  # the coefficient share of each band for white noise
    assert (energy[:, 1:].sum(1) / energy.sum(1)).mean() > 0.5 * flat[1:].sum()  # not a low-band overlay
    # the opacity: (out - x) = a (u - x) with a in [wb_min, wb_max], so |out - x| <= wb_max
    assert diff.abs().max() <= CFG.wb_max + 1e-6 and diff.abs().max() >= CFG.wb_min / 2


def test_hf_patch_is_local_and_sized(x_digits):
    cfg = FreqAugConfig()
    kmin, kmax = cfg.patch_range(8, 8)
    assert (kmin, kmax) == (1, 3)
    assert cfg.patch_range(32, 32) == (3, 8)
    out = hf_patch(x_digits, cfg, _gen())
    changed = (out != x_digits).any(1)  # [N,H,W]
    for m in changed:
        rows, cols = torch.nonzero(m, as_tuple=True)
        if len(rows):  # a patch equal to the content it covers changes nothing
            assert rows.max() - rows.min() + 1 <= kmax and cols.max() - cols.min() + 1 <= kmax
    assert changed.flatten(1).any(1).float().mean() > 0.8
    # on a flat grey image the patches add high-frequency energy
    flat = torch.full((32, 1, 8, 8), 0.5, dtype=torch.float64)
    assert (band_energy(hf_patch(flat, cfg, _gen(1)), 0.5, 1.0) > 0).float().mean() > 0.5


def test_fft_amp_keeps_phase_and_moves_amplitude():
    g = _gen(3)
    x = 0.5 + 0.1 * torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64).clamp(-2, 2)
    partner = 0.5 + 0.1 * torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64).clamp(-2, 2)
    cfg = FreqAugConfig(amp_min=0.5, amp_max=0.5, amp_rho_max=1.0)
    out = fft_amp(x, partner, cfg, _gen())
    assert out.min() > 0 and out.max() < 1  # no clamping happened
    fx, fo, fp = torch.fft.fft2(x), torch.fft.fft2(out), torch.fft.fft2(partner)
    mask = fx.abs() > 1e-6
    phase_err = torch.angle(fo[mask] * fx[mask].conj()).abs()
    assert phase_err.max().item() < 1e-6
    assert torch.allclose(fo.abs(), 0.5 * fx.abs() + 0.5 * fp.abs(), atol=1e-9)


def test_augment_keeps_labels_and_points_at_sources(digits):
    images, labels = digits[0][:30], digits[1][:30]
    res = augment(images, labels, list(OPS), copies=2, params=CFG, seed=5)
    assert res.images.shape == (30 * len(OPS) * 2, 8, 8, 1) and res.images.dtype == np.uint8
    assert np.array_equal(res.labels, labels[res.source_index])
    assert set(res.variant_names) == set(OPS)
    for op in OPS:
        assert (res.variant_names == op).sum() == 60
    again = augment(images, labels, list(OPS), copies=2, params=CFG, seed=5)
    assert np.array_equal(res.images, again.images)
    other = augment(images, labels, list(OPS), copies=2, params=CFG, seed=6)
    assert not np.array_equal(res.images, other.images)
    # an op's output does not depend on which other ops run
    only_patch = augment(images, labels, ["hf-patch"], copies=1, params=CFG, seed=5)
    assert np.array_equal(only_patch.images, res.images[res.variant_names == "hf-patch"][:30])
    assert len(augment(images, labels, "", 1, CFG, 0).images) == 0


def test_unknown_op_lists_allowed():
    with pytest.raises(FreqAugError, match="allowed: hf-noise, hf-patch, lf-blend, wb-blend, fft-amp"):
        augment(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2), "hf-noise,jpeg", 1, CFG, 0)
    with pytest.raises(FreqAugError, match="eps_min"):
        FreqAugConfig(eps_min=0.3, eps_max=0.1)


def test_augment_dataset_round_trips(tmp_path, digits):
    images, labels = digits[0][:20], digits[1][:20]
    clean = ServerDataset(images, labels, np.zeros(20), np.arange(20), [str(i) for i in range(10)])
    ds = augment_dataset(clean, "hf-noise,lf-blend", copies=1, seed=0)
    assert ds.variant_names == ["clean", "hf-noise", "lf-blend"]
    assert len(ds) == 60 and np.all(ds.variants[ds.source_index] == 0)
    assert np.array_equal(ds.labels, ds.labels[ds.source_index])
    ds.save(tmp_path / "sds")
    back = ServerDataset.load(tmp_path / "sds")
    assert back.content_hash() == ds.content_hash()
    assert back.meta["faug"]["ops"] == ["hf-noise", "lf-blend"]


def test_subset_keeps_per_class_clean_rows_and_all_their_variants(digits):
    images, labels = digits[0][:60], digits[1][:60]
    clean = ServerDataset(images, labels, np.zeros(60), np.arange(60), [str(i) for i in range(10)])
    ds = augment_dataset(clean, "hf-noise,lf-blend", copies=1, seed=0)
    sub = ds.subset(2, seed=3)
    counts = np.bincount(sub.labels[sub.variants == 0], minlength=10)
    full = np.bincount(labels, minlength=10)
    assert np.array_equal(counts, np.minimum(full, 2))
    assert len(sub) == 3 * counts.sum()  # every kept clean row with both of its variants
    assert np.all(sub.variants[sub.source_index] == 0)
    assert np.array_equal(sub.labels, sub.labels[sub.source_index])
    # each variant row still points at the very image it was made from
    for i in np.flatnonzero(sub.variants != 0):
        j = np.flatnonzero((ds.images == sub.images[i]).all(axis=(1, 2, 3)))[0]
        assert np.array_equal(ds.images[ds.source_index[j]], sub.images[sub.source_index[i]])
    assert sub.meta["subset"] == {"per_class": 2, "seed": 3, "of": len(ds)}
    assert np.array_equal(ds.subset(2, seed=3).images, sub.images)  # deterministic
    assert len(ds.subset(100)) == len(ds)
    with pytest.raises(ValueError, match="per_class"):
        ds.subset(0)


def test_config_from_run_config_strings():
    cfg = FreqAugConfig.from_mapping({"eps-max": "0.2", "patch_max": "4", "patch-patterns": "binary,solid", "patch-min": "auto"})
    assert cfg.eps_max == 0.2 and cfg.patch_max == 4 and cfg.patch_min is None
    assert cfg.patch_patterns == ("binary", "solid") and cfg.patch_range(8, 8) == (1, 4)
    with pytest.raises(FreqAugError, match="allowed: rho-hi, rho-lo"):
        FreqAugConfig.from_mapping({"eps": "0.1"})
    with pytest.raises(FreqAugError, match="must be a number"):
        FreqAugConfig.from_mapping({"rho-hi": "high"})
    with pytest.raises(FreqAugError, match="patch_patterns"):
        FreqAugConfig.from_mapping({"patch-patterns": "stars"})
