"""Frequency-domain augmentation of the server dataset (CLIP-Fed's "frequency analysis").

Many backdoor triggers show up as high-frequency artefacts (Zeng et al., "Rethinking the backdoor
attacks' triggers: a frequency perspective", ICCV 2021, https://arxiv.org/abs/2104.03413); smooth
ones (Blend, SIG) live in the low band. Each family below makes trigger-*like* variants of clean
images that keep their clean label, so a model that reacts to such inputs can be spotted (screening)
and un-taught (distillation). Families (see docs / method.md section 4):

* ``hf-noise``: additive noise restricted to the high DCT band (rho >= rho_hi).
* ``hf-patch``: a k x k patch (binary, checkerboard, high-pass or solid pattern) pasted at a random
  position, BadNets/DBA-like.
* ``lf-blend``: a global overlay of smooth low-band noise (rho <= rho_lo), Blend-like.
* ``wb-blend``: a global overlay of white (flat-spectrum, every band) noise, ``(1 - a) x + a u`` with
  u ~ U[0, 1] per pixel: what the usual Blend trigger (a fixed random-noise image blended at 0.1–0.3)
  looks like in frequency. A model backdoored with one noise image also answers its target on fresh
  noise (CIFAR-10, Blend at 0.2: 47–77 % of rows at a = 0.2–0.3 vs 15–18 % for a benign model).
* ``fft-amp``: the FFT amplitude spectrum mixed with another image's, phase kept (style/colour).

Everything works on float NCHW tensors in [0, 1] and takes an explicit ``torch.Generator`` (random
draws happen on CPU, so results do not depend on the device).
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

ANCHORS = ("tl", "tr", "bl", "br", "center")
ANCHORED_PATCH_OPS = tuple(f"patch-{a}" for a in ANCHORS)
OPS = ("hf-noise", "hf-patch", "lf-blend", "wb-blend", "fft-amp") + ANCHORED_PATCH_OPS
PATCH_PATTERNS = ("binary", "checkerboard", "highpass", "solid")


class FreqAugError(ValueError):
    """An augmentation setting is invalid."""


# --------------------------------------------------------------------------- DCT


@functools.lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``D @ x`` transforms a length-``n`` signal; ``D.T`` inverts)."""
    return _dct_matrix_cpu(int(n)).to(device=device, dtype=dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (any leading batch/channel dims)."""
    h, w = x.shape[-2:]
    dh = dct_matrix(h, x.device, x.dtype)
    dw = dct_matrix(w, x.device, x.dtype)
    return dh @ x @ dw.T


def idct2(coef: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (orthonormal DCT-III)."""
    h, w = coef.shape[-2:]
    dh = dct_matrix(h, coef.device, coef.dtype)
    dw = dct_matrix(w, coef.device, coef.dtype)
    return dh.T @ coef @ dw


def dct_radius(h: int, w: int, device=None) -> torch.Tensor:
    """Normalised DCT radius ``rho(u, v) = (u + v) / (H + W - 2)`` in [0, 1], shape [H, W]."""
    u = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    v = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    return (u + v) / max(h + w - 2, 1)


def band_mask(h: int, w: int, lo: float = 0.0, hi: float = 1.0, device=None) -> torch.Tensor:
    """``1[lo <= rho <= hi]`` as a float [H, W] mask."""
    rho = dct_radius(h, w, device)
    return ((rho >= lo - 1e-9) & (rho <= hi + 1e-9)).float()


def band_energy(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Per-image DCT energy (sum of squared coefficients over channels) inside ``lo <= rho <= hi``."""
    coef = dct2(x.float())
    mask = band_mask(*x.shape[-2:], lo, hi, x.device)
    return (coef.pow(2) * mask).flatten(1).sum(1)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FreqAugConfig:
    """Parameters of the augmentation families (defaults: clipfed's, see method.md section 8).

    Parameters
    ----------
    rho_hi : float
        ``hf-noise`` perturbs DCT coefficients with normalised radius >= ``rho_hi``. Default 0.5.
    rho_lo : float
        ``lf-blend`` overlays use coefficients with radius <= ``rho_lo``. Default 0.15.
    eps_min, eps_max : float
        ``hf-noise`` peak amplitude (L-inf of the added pattern) drawn from U[eps_min, eps_max].
        Defaults 0.03, 0.15.
    patch_min, patch_max : int or None
        ``hf-patch`` side k drawn from U{patch_min..patch_max} pixels. ``None`` scales with the
        resolution S = min(H, W): ``max(1, round(3 S / 32))`` and ``max(3, round(8 S / 32))``
        (3..8 px at 32x32, 1..3 px at 8x8), capped at S.
    patch_patterns : tuple of str
        Patterns drawn uniformly per image, from ``binary``, ``checkerboard``, ``highpass``,
        ``solid``. Default all four.
    blend_min, blend_max : float
        ``lf-blend`` opacity drawn from U[blend_min, blend_max]. Defaults 0.05, 0.2.
    wb_min, wb_max : float
        ``wb-blend`` opacity drawn from U[wb_min, wb_max]. Defaults 0.1, 0.3.
    amp_min, amp_max : float
        ``fft-amp`` mixing weight of the partner's amplitude, U[amp_min, amp_max]. Defaults 0.1, 0.5.
    amp_rho_max : float
        ``fft-amp`` mixes only FFT frequencies with normalised radius <= this (1.0 = all). Default 0.5.
    """

    rho_hi: float = 0.5
    rho_lo: float = 0.15
    eps_min: float = 0.03
    eps_max: float = 0.15
    patch_min: int | None = None
    patch_max: int | None = None
    patch_patterns: tuple = PATCH_PATTERNS
    blend_min: float = 0.05
    blend_max: float = 0.2
    wb_min: float = 0.1
    wb_max: float = 0.3
    amp_min: float = 0.1
    amp_max: float = 0.5
    amp_rho_max: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_patterns", tuple(self.patch_patterns))
        for lo, hi in (("eps_min", "eps_max"), ("blend_min", "blend_max"), ("wb_min", "wb_max"), ("amp_min", "amp_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0.0 <= a <= b <= 1.0:
                raise FreqAugError(f"{lo}/{hi} must satisfy 0 <= {lo} <= {hi} <= 1, got {a}, {b}")
        for name in ("rho_hi", "rho_lo", "amp_rho_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FreqAugError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        bad = [p for p in self.patch_patterns if p not in PATCH_PATTERNS]
        if bad or not self.patch_patterns:
            raise FreqAugError(f"patch_patterns {bad or '()'} not allowed; choose from {list(PATCH_PATTERNS)}")
        if self.patch_min is not None and self.patch_max is not None and not 1 <= self.patch_min <= self.patch_max:
            raise FreqAugError(f"patch_min/patch_max must satisfy 1 <= min <= max, got {self.patch_min}, {self.patch_max}")

    def patch_range(self, h: int, w: int) -> tuple[int, int]:
        """``(k_min, k_max)`` in pixels for images of size H x W."""
        s = min(h, w)
        kmin = self.patch_min if self.patch_min is not None else max(1, round(3 * s / 32))
        kmax = self.patch_max if self.patch_max is not None else max(3, round(8 * s / 32))
        kmin, kmax = min(kmin, s), min(kmax, s)
        return kmin, max(kmin, kmax)

    @classmethod
    def from_mapping(cls, mapping: dict) -> "FreqAugConfig":
        """Build from ``{"rho-hi": "0.6", "patch_max": 4, "patch-patterns": "binary,solid"}``-style
        settings (kebab or snake keys, strings or numbers); unknown keys raise naming the allowed ones."""
        names = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in mapping.items():
            name = str(key).strip().replace("-", "_")
            if name not in names:
                allowed = ", ".join(n.replace("_", "-") for n in names)
                raise FreqAugError(f"unknown frequency-augmentation setting {key!r}; allowed: {allowed}")
            if name == "patch_patterns":
                value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
            elif name in ("patch_min", "patch_max"):
                value = None if value in (None, "", "auto") else int(value)
            else:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise FreqAugError(f"frequency-augmentation setting {key!r} must be a number, got {value!r}") from None
            kwargs[name] = value
        return cls(**kwargs)

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def parse_ops(ops) -> list[str]:
    """Validate a list or CSV string of op names; ``""`` / ``None`` mean no augmentation."""
    if ops is None:
        return []
    if isinstance(ops, str):
        ops = [o.strip() for o in ops.split(",")]
    ops = [o for o in ops if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise FreqAugError(f"unknown augmentation op(s) {bad}; allowed: {', '.join(OPS)}")
    if len(set(ops)) != len(ops):
        raise FreqAugError(f"augmentation ops repeat: {ops}")
    return ops


# --------------------------------------------------------------------------- helpers


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _minmax01(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def _band_noise(shape, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise restricted to a DCT band, in the pixel domain (CPU)."""
    h, w = shape[-2:]
    coef = torch.randn(shape, generator=gen) * band_mask(h, w, lo, hi)
    return idct2(coef)


# --------------------------------------------------------------------------- the families


def hf_noise(x: torch.Tensor, cfg: FreqAugConfig, gen: torch.Generator) -> torch.Tensor:
    """``x + eps * P / ||P||_inf`` with ``P = IDCT2(N * M_hi)``, eps ~ U[eps_min, eps_max]; clamped."""
    n = x.shape[0]
    p = _band_noise(x.shape, cfg.rho_hi, 1.0, gen)
    p = p / p.flatten(1).abs().max(1).values.clamp_min(1e-8).view(n, 1, 1, 1)
    eps = _uniform(n, cfg.eps_min, cfg.eps_max, gen).view(n, 1, 1, 1)
    return (x + (eps * p).to(x.device, x.dtype)).clamp(0.0, 1.0)


def _patch_pattern(kind: str, c: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "binary":
        if torch.rand(1, generator=gen).item() < 0.5:  # grey-level pattern shared by all channels
            return (torch.rand(1, k, k, generator=gen) < 0.5).float().expand(c, k, k).clone()
        return (torch.rand(c, k, k, generator=gen) < 0.5).float()
    if kind == "checkerboard":
        ij = torch.arange(k)[:, None] + torch.arange(k)[None, :] + int(torch.randint(2, (1,), generator=gen))
        board = (ij % 2).float()
        c0 = (torch.rand(c, generator=gen) < 0.5).float()
        c1 = 1.0 - c0
        return c0.view(c, 1, 1) * (1 - board) + c1.view(c, 1, 1) * board
    if kind == "highpass":
        if k == 1:
            return (torch.rand(c, 1, 1, generator=gen) < 0.5).float()
        return _minmax01(_band_noise((1, c, k, k), 0.5, 1.0, gen))[0]
    if kind == "solid":
        return (torch.rand(c, 1, 1, generator=gen) < 0.5).float().expand(c, k, k).clone()
    raise FreqAugError(f"unknown patch pattern {kind!r}; choose from {list(PATCH_PATTERNS)}")


def _anchored_origin(anchor: str, h: int, w: int, k: int, gen: torch.Generator) -> tuple[int, int]:
    """Top-left of a k x k patch near ``anchor`` (a corner or the centre), 0..2 px from the border."""
    m = int(torch.randint(0, 3 if min(h, w) >= 16 else 2, (1,), generator=gen))
    if anchor == "center":
        return (h - k) // 2, (w - k) // 2
    top = m if anchor[0] == "t" else h - k - m
    left = m if anchor[1] == "l" else w - k - m
    return max(top, 0), max(left, 0)


def hf_patch(x: torch.Tensor, cfg: FreqAugConfig, gen: torch.Generator, anchor: str | None = None) -> torch.Tensor:
    """Paste one random k x k pattern per image (BadNets/DBA-like).

    ``anchor=None`` places it uniformly at random; ``"tl"``, ``"tr"``, ``"bl"``, ``"br"`` or
    ``"center"`` near that corner or the centre, where patch triggers are usually stamped (a
    position-specific backdoor only fires when the patch lands near its position).
    """
    n, c, h, w = x.shape
    kmin, kmax = cfg.patch_range(h, w)
    out = x.clone()
    for i in range(n):
        k = int(torch.randint(kmin, kmax + 1, (1,), generator=gen))
        kind = cfg.patch_patterns[int(torch.randint(len(cfg.patch_patterns), (1,), generator=gen))]
        if anchor is None:
            top = int(torch.randint(h - k + 1, (1,), generator=gen))
            left = int(torch.randint(w - k + 1, (1,), generator=gen))
        else:
            top, left = _anchored_origin(anchor, h, w, k, gen)
        out[i, :, top : top + k, left : left + k] = _patch_pattern(kind, c, k, gen).to(x.device, x.dtype)
    return out.clamp(0.0, 1.0)


def lf_blend(x: torch.Tensor, cfg: FreqAugConfig, gen: torch.Generator) -> torch.Tensor:
    """``(1 - a) x + a g`` with ``g = minmax01(IDCT2(N * M_lo))``, a ~ U[blend_min, blend_max]."""
    n = x.shape[0]
    g = _minmax01(_band_noise(x.shape, 0.0, cfg.rho_lo, gen))
    a = _uniform(n, cfg.blend_min, cfg.blend_max, gen).view(n, 1, 1, 1)
    return ((1 - a.to(x.device)) * x + (a * g).to(x.device, x.dtype)).clamp(0.0, 1.0)


def wb_blend(x: torch.Tensor, cfg: FreqAugConfig, gen: torch.Generator) -> torch.Tensor:
    """``(1 - a) x + a u`` with white noise u ~ U[0, 1] per pixel and channel, a ~ U[wb_min, wb_max]."""
    n = x.shape[0]
    u = torch.rand(tuple(x.shape), generator=gen)
    a = _uniform(n, cfg.wb_min, cfg.wb_max, gen).view(n, 1, 1, 1)
    return ((1 - a.to(x.device)) * x + (a * u).to(x.device, x.dtype)).clamp(0.0, 1.0)


def fft_radius(h: int, w: int, device=None) -> torch.Tensor:
    """Normalised FFT radius ``(|f_y| + |f_x|) / 1.0`` with frequencies in cycles/pixel (max 1)."""
    fy = torch.fft.fftfreq(h, device=device).abs()[:, None]
    fx = torch.fft.fftfreq(w, device=device).abs()[None, :]
    return fy + fx


def fft_amp(x: torch.Tensor, partner: torch.Tensor, cfg: FreqAugConfig, gen: torch.Generator) -> torch.Tensor:
    """Mix the FFT amplitude of ``x`` with ``partner``'s inside the band, keeping ``x``'s phase.

    ``|X'| = (1 - lam) |X| + lam |Y|`` where radius <= ``amp_rho_max``; lam ~ U[amp_min, amp_max].
    """
    n = x.shape[0]
    dt = torch.promote_types(x.dtype, torch.float32)
    fx = torch.fft.fft2(x.to(dt))
    fy = torch.fft.fft2(partner.to(x.device, dt))
    band = (fft_radius(*x.shape[-2:], x.device) <= cfg.amp_rho_max + 1e-9).float()
    lam = _uniform(n, cfg.amp_min, cfg.amp_max, gen).view(n, 1, 1, 1).to(x.device, dt) * band
    amp = (1 - lam) * fx.abs() + lam * fy.abs()
    out = torch.fft.ifft2(torch.polar(amp, torch.angle(fx))).real
    return out.to(x.dtype).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- top level


class AugmentResult(NamedTuple):
    images: np.ndarray  # uint8 [M, H, W, C]
    labels: np.ndarray  # int64 [M], the clean label of the source
    variant_names: np.ndarray  # str [M], the op that made each row
    source_index: np.ndarray  # int64 [M], row of the clean source in the input


def op_generator(seed: int, copy: int, op: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, copy, op)``: adding or reordering ops changes no other op."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(copy), zlib.crc32(op.encode())])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))


def apply_op(op: str, x: torch.Tensor, cfg: FreqAugConfig, gen: torch.Generator) -> torch.Tensor:
    """Apply one family to a float NCHW batch in [0, 1]."""
    if op == "hf-noise":
        return hf_noise(x, cfg, gen)
    if op == "hf-patch":
        return hf_patch(x, cfg, gen)
    if op in ANCHORED_PATCH_OPS:
        return hf_patch(x, cfg, gen, anchor=op.removeprefix("patch-"))
    if op == "lf-blend":
        return lf_blend(x, cfg, gen)
    if op == "wb-blend":
        return wb_blend(x, cfg, gen)
    if op == "fft-amp":
        n = x.shape[0]
        if n < 2:
            return x.clone()
        shift = torch.randint(1, n, (n,), generator=gen)  # a partner that is never the image itself
        partner = x[(torch.arange(n) + shift) % n]
        return fft_amp(x, partner, cfg, gen)
    raise FreqAugError(f"unknown augmentation op {op!r}; allowed: {', '.join(OPS)}")


def to_float_nchw(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).permute(0, 3, 1, 2).float().div(255.0)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def augment(
    images_uint8_nhwc: np.ndarray,
    labels: np.ndarray,
    ops,
    copies: int = 1,
    params: FreqAugConfig | None = None,
    seed: int = 0,
) -> AugmentResult:
    """Make ``copies`` variants of every image for each op; labels stay the clean ones.

    Parameters
    ----------
    images_uint8_nhwc : ndarray
        Clean images, uint8 [N, H, W, C].
    labels : ndarray
        Their labels, int [N].
    ops : list of str or CSV str
        Families from ``OPS``; ``[]`` / ``""`` returns an empty result.
    copies : int
        Variants per image and op. Default 1.
    params : FreqAugConfig, optional
        Family parameters. Default ``FreqAugConfig()``.
    seed : int
        Seed; the same inputs and seed give the same bytes. Default 0.

    Returns
    -------
    AugmentResult
        ``(images, labels, variant_names, source_index)``, rows ordered copy-major, then op,
        then source; ``source_index`` indexes the input rows.
    """
    ops = parse_ops(ops)
    params = params or FreqAugConfig()
    if copies < 0:
        raise FreqAugError(f"copies must be >= 0, got {copies}")
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise FreqAugError(f"images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(images)
    x = to_float_nchw(images)
    out_images, out_labels, out_names, out_src = [], [], [], []
    for copy in range(copies):
        for op in ops:
            if n == 0:
                continue
            aug = apply_op(op, x, params, op_generator(seed, copy, op))
            out_images.append(to_uint8_nhwc(aug))
            out_labels.append(labels)
            out_names.append(np.full(n, op, dtype=object))
            out_src.append(np.arange(n, dtype=np.int64))
    if not out_images:
        h, w, c = images.shape[1:]
        return AugmentResult(
            np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int64)
        )
    return AugmentResult(
        np.concatenate(out_images), np.concatenate(out_labels), np.concatenate(out_names), np.concatenate(out_src)
    )


def augment_dataset(dataset, ops, copies: int = 1, params: FreqAugConfig | None = None, seed: int = 0):
    """Return a new ``ServerDataset``: the clean rows of ``dataset`` plus fresh augmented variants.

    Used both by ``data_synth`` and by the strategy when it re-draws D_a every few rounds.
    """
    from .server_dataset import CLEAN, ServerDataset

    ops = parse_ops(ops)
    clean = np.flatnonzero(dataset.clean_mask())
    images, labels = dataset.images[clean], dataset.labels[clean]
    res = augment(images, labels, ops, copies, params, seed)
    names = [CLEAN] + ops
    variants = np.concatenate([np.zeros(len(clean), np.int64), np.array([names.index(v) for v in res.variant_names], np.int64)])
    meta = dict(dataset.meta)
    meta["faug"] = {"ops": ops, "copies": copies, "seed": seed, "params": (params or FreqAugConfig()).as_dict()}
    log.info("frequency augmentation: %d clean images -> %d variants (%s x %d)", len(clean), len(res.images), ",".join(ops) or "none", copies)
    return ServerDataset(
        images=np.concatenate([images, res.images]),
        labels=np.concatenate([labels, res.labels]),
        variants=variants,
        source_index=np.concatenate([np.arange(len(clean), dtype=np.int64), res.source_index]),
        class_names=dataset.class_names,
        variant_names=names,
        meta=meta,
    )
