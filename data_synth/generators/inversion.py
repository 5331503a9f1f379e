"""``teacher-inversion``: data-free synthesis by optimising images against the teacher.

Images are optimised so that the teacher's zero-shot score for their class rises (cross-entropy on
``logit_scale * emb @ text_prototypes.T``), under image priors: total variation, an l2 pull to grey,
random jitter (roll) and flips per step, and -- when the teacher's vision tower has BatchNorm layers
-- DeepInversion's feature-statistics prior (Yin et al., CVPR 2020, https://arxiv.org/abs/1912.08795).
A diversity term penalises cosine similarity between the image embeddings of one class in a batch.
Images live at the FL resolution and channel count (8x8x1 for digits, 32x32x3 for CIFAR); the
teacher upsamples them itself. All classes of a chunk are optimised in one batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipfed_strategy.freq_augment import dct_matrix, to_uint8_nhwc

from ..errors import SynthError
from .base import GenContext, Request, derive_seed

log = logging.getLogger(__name__)

PARAMS = ("pixel", "dct")


LEGACY_W_BN = 0.1
"""The fixed default of ``w_bn`` before it depended on the channels."""


def default_w_bn(channels: int) -> float:
    """The BatchNorm-prior weight used when ``InversionConfig.w_bn`` is None (see there)."""
    return LEGACY_W_BN if channels == 1 else 0.01


@dataclass(frozen=True)
class InversionConfig:
    """Settings of ``teacher-inversion``.

    Parameters
    ----------
    steps : int
        Optimisation steps per batch. Default 100.
    lr : float
        Adam learning rate on the (pre-sigmoid) parameters. Default 0.25.
    param : str
        ``"pixel"`` (default): images are ``sigmoid(z)``; ``"dct"``: ``sigmoid(IDCT2(z * w))`` with
        ``w = (1 + u + v)^-dct_decay``, which favours smooth images.
    dct_decay : float
        Spectral decay of the ``dct`` parameterisation. Default 0.5.
    w_tv : float
        Weight of the (anisotropic, mean absolute) total variation. Default 0.05.
    w_l2 : float
        Weight of ``mean((x - 0.5)^2)``. Default 0 (the BatchNorm prior sets intensities better).
    w_div : float
        Weight of the mean pairwise cosine similarity of same-class embeddings. Default 0.2.
    w_bn : float or None
        Weight of the BatchNorm statistics prior (0 = off; ignored when the teacher has no
        BatchNorm). None (default) = 0.1 for grey images, 0.01 for colour: on the CIFAR-10
        stand-in teacher (19 BatchNorm layers) 0.1 let the prior win over the class objective
        (the teacher's own top-1 on the results was 0.32, and a CIFAR model trained on real
        images classified 0.18 of them as intended); 0.01 gave 0.94 and 0.34, 0.03 gave 0.78 and
        0.34. On digits 0.1 gave 97 % teacher top-1.
    bn_first_mult : float
        Extra weight of the first BatchNorm layer (low-level statistics: intensity, contrast),
        as in DeepInversion's reference code. Default 10.
    jitter : int or None
        Max roll in pixels per step; None = ``max(1, round(min(H, W) / 16))``.
    flip : bool or None
        Random horizontal flips per step; None = on for RGB, off for grey (digits are chiral).
    crop_min : float
        Random-resized-crop augmentation per image and step: a square crop of side
        ``U[crop_min, 1]`` times the image, at a random position, resized back (bilinear) before
        the teacher sees it. 1.0 (default) = off. Images that keep their class under strong crops
        rely less on fragile, adversarial-like pixel patterns.
    batch_size : int
        Images optimised together (classes interleaved). Default 1000.
    init_std : float
        Std of the initial parameters. Default 0.5.
    """

    steps: int = 100
    lr: float = 0.25
    param: str = "pixel"
    dct_decay: float = 0.5
    w_tv: float = 0.05
    w_l2: float = 0.0
    w_div: float = 0.2
    w_bn: float | None = None
    bn_first_mult: float = 10.0
    jitter: int | None = None
    flip: bool | None = None
    crop_min: float = 1.0
    batch_size: int = 1000
    init_std: float = 0.5

    def __post_init__(self) -> None:
        if self.param not in PARAMS:
            raise SynthError(f"inversion param {self.param!r} not allowed; choose from {list(PARAMS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise SynthError(f"inversion steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 < self.crop_min <= 1:
            raise SynthError(f"inversion crop_min must lie in (0, 1], got {self.crop_min}")
        for name in ("lr", "w_tv", "w_l2", "w_div", "w_bn", "bn_first_mult", "init_std", "dct_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise SynthError(f"inversion {name} must be >= 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------- teacher access


def embed_with_grad(teacher, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised teacher image embeddings that keep the graph back to ``x``.

    ``Teacher.encode_images`` runs under ``no_grad``; this uses the teacher's own preprocessing and
    vision encoder instead (``encode_images_with_grad`` if the teacher offers one).
    """
    fn = getattr(teacher, "encode_images_with_grad", None)
    if callable(fn):
        return fn(x)
    backend = getattr(teacher, "_backend", None)
    if backend is not None and callable(getattr(teacher, "preprocess", None)):
        dev = getattr(teacher, "device", x.device)
        amp = torch.autocast("cuda", dtype=torch.float16) if torch.device(dev).type == "cuda" else contextlib.nullcontext()
        with amp:
            emb = backend.encode_pixels(teacher.preprocess(x))
        return F.normalize(emb.float(), dim=-1)
    emb = teacher.encode_images(x)
    if not emb.requires_grad:
        raise SynthError(
            "teacher-inversion needs gradients through the teacher, but teacher.encode_images returns "
            "a tensor without them; give the teacher an encode_images_with_grad(x) method"
        )
    return emb


def _teacher_modules(teacher) -> list[torch.nn.Module]:
    if isinstance(teacher, torch.nn.Module):
        return [teacher]
    return [v for v in vars(teacher).values() if isinstance(v, torch.nn.Module)]


class _BNStatsPrior:
    """Forward hooks collecting ``||mu - running_mean|| + ||var - running_var||`` per BN layer."""

    def __init__(self, teacher, first_mult: float = 1.0):
        self.first_mult = float(first_mult)
        self.layers = []
        seen = set()
        for mod in _teacher_modules(teacher):
            for m in mod.modules():
                if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None and id(m) not in seen:
                    seen.add(id(m))
                    self.layers.append(m)
        self.terms: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self):
        for m in self.layers:
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, inputs, output):
        x = inputs[0].float()
        mu = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.norm(mu - module.running_mean.float(), 2) + torch.norm(var - module.running_var.float(), 2))

    def pop(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        out = self.first_mult * self.terms[0] + sum(self.terms[1:], self.terms[0].new_zeros(()))
        self.terms = []
        return out


# --------------------------------------------------------------------------- maths


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute difference between neighbouring pixels, [N]."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def jitter_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Roll image i by ``shifts[i] = (dy, dx)`` (wrap-around) and flip it horizontally where ``flips[i]``."""
    n, c, h, w = x.shape
    dev = x.device
    rows = (torch.arange(h, device=dev)[None, :] - shifts[:, :1].to(dev)) % h  # [N, H]
    cols = (torch.arange(w, device=dev)[None, :] - shifts[:, 1:].to(dev)) % w  # [N, W]
    cols = torch.where(flips.to(dev)[:, None], (w - 1) - cols, cols)
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(c, device=dev)[None, :, None, None]
    return x[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def random_resized_crop(x: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Crop image i to a square of side ``scales[i]`` (fraction of the image) centred at ``offsets[i]``
    (normalised coordinates in [-1, 1], already limited to keep the crop inside) and resize it back to
    the full size, bilinearly; differentiable in ``x``."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = scales.to(x)
    theta[:, 1, 1] = scales.to(x)
    theta[:, :, 2] = offsets.to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def class_similarity(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over classes of the mean off-diagonal cosine similarity of that class's embeddings."""
    total = emb.new_zeros(())
    for c in labels.unique():
        e = emb[labels == c]
        m = len(e)
        if m < 2:
            continue
        sim = e @ e.T
        total = total + (sim.sum() - sim.diagonal().sum()) / (m * (m - 1))
    return total


def dct_weights(h: int, w: int, decay: float, device) -> torch.Tensor:
    u = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    v = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    return (1.0 + u + v).pow(-decay)


# --------------------------------------------------------------------------- generator


class TeacherInversionGenerator:
    """Data-free generator: images that the teacher scores as their class (see module docstring)."""

    name = "teacher-inversion"
    joint = True

    def __init__(self, ctx: GenContext, config: InversionConfig | None = None):
        if ctx.teacher is None:
            raise SynthError("generator 'teacher-inversion' needs a teacher (--clip-* flags or --standin)")
        self.ctx = ctx
        self.config = config or InversionConfig()
        h, w = ctx.resolution
        self.jitter = self.config.jitter if self.config.jitter is not None else max(1, round(min(h, w) / 16))
        self.flip = self.config.flip if self.config.flip is not None else ctx.channels == 3
        self.w_bn = self.config.w_bn if self.config.w_bn is not None else default_w_bn(ctx.channels)
        self.bn_prior = _BNStatsPrior(ctx.teacher, self.config.bn_first_mult) if self.w_bn > 0 else None
        if self.bn_prior is not None and not self.bn_prior.layers:
            self.bn_prior = None
        log.info(
            "teacher-inversion: %s param, %d steps, jitter %d px, flip %s, BN prior %s",
            self.config.param,
            self.config.steps,
            self.jitter,
            self.flip,
            f"on ({len(self.bn_prior.layers)} layers)" if self.bn_prior else "off",
        )

    def capacity(self, class_id: int) -> int | None:
        return None

    def describe(self) -> dict:
        cfg = asdict(self.config)
        cfg.update(jitter=self.jitter, flip=self.flip, w_bn=self.w_bn, bn_prior=self.bn_prior is not None)
        return {"name": self.name, "provenance": "data-free inversion of the teacher", "config": cfg}

    # ------------------------------------------------------------------ helpers
    def _images(self, z: torch.Tensor, wts: torch.Tensor | None) -> torch.Tensor:
        if self.config.param == "pixel":
            return torch.sigmoid(z)
        h, w = z.shape[-2:]
        dh, dw = dct_matrix(h, z.device), dct_matrix(w, z.device)
        return torch.sigmoid(dh.T @ (z * wts) @ dw)

    def _optimise(self, labels: torch.Tensor, seed: int, desc: str) -> torch.Tensor:
        cfg, ctx = self.config, self.ctx
        dev = ctx.device
        n = len(labels)
        h, w = ctx.resolution
        gen = torch.Generator().manual_seed(seed)
        z = (torch.randn(n, ctx.channels, h, w, generator=gen) * cfg.init_std).to(dev).requires_grad_(True)
        wts = dct_weights(h, w, cfg.dct_decay, dev) if cfg.param == "dct" else None
        opt = torch.optim.Adam([z], lr=cfg.lr)
        y = labels.to(dev)
        teacher = ctx.teacher
        protos = teacher.text_prototypes.to(dev).float()
        scale = float(teacher.logit_scale)
        per_class = torch.bincount(labels, minlength=len(ctx.class_names)).float().to(dev)
        n_cls = int((per_class > 0).sum())
        sample_w = 1.0 / (per_class.clamp_min(1)[y] * n_cls)  # mean over classes of per-class means
        bn = self.bn_prior or contextlib.nullcontext()
        with bn, tqdm(range(cfg.steps), desc=desc, disable=not ctx.progress, leave=False) as bar:
            for _ in bar:
                shifts = torch.randint(-self.jitter, self.jitter + 1, (n, 2), generator=gen)
                flips = (torch.rand(n, generator=gen) < 0.5) & self.flip
                x = self._images(z, wts)
                seen = jitter_flip(x, shifts, flips)
                if cfg.crop_min < 1:
                    scales = cfg.crop_min + (1 - cfg.crop_min) * torch.rand(n, generator=gen)
                    offsets = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - scales)[:, None]
                    seen = random_resized_crop(seen, scales, offsets)
                emb = embed_with_grad(teacher, seen)
                logits = scale * emb @ protos.T
                per_sample = F.cross_entropy(logits, y, reduction="none")
                per_sample = per_sample + cfg.w_tv * total_variation(x) + cfg.w_l2 * (x - 0.5).pow(2).flatten(1).mean(1)
                loss = (per_sample * sample_w).sum()
                if cfg.w_div > 0:
                    loss = loss + cfg.w_div * class_similarity(emb, y) / n_cls
                if self.bn_prior is not None:
                    term = self.bn_prior.pop()
                    if term is not None:
                        loss = loss + self.w_bn * term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            return self._images(z, wts).detach()

    # ------------------------------------------------------------------ API
    def generate(self, requests: Sequence[Request], chunk: int, seed: int) -> dict[int, np.ndarray]:
        """Optimise ``sum(count)`` images, classes interleaved, in batches of ``batch_size``."""
        order: list[tuple[int, int]] = []  # (class, index within this request), round-robin over classes
        longest = max((r.count for r in requests), default=0)
        for i in range(longest):
            order.extend((r.class_id, i) for r in requests if i < r.count)
        labels = torch.tensor([c for c, _ in order], dtype=torch.int64)
        outs = []
        bs = self.config.batch_size
        nb = math.ceil(len(order) / bs) if order else 0
        for b in range(nb):
            lab = labels[b * bs : (b + 1) * bs]
            desc = f"inversion chunk {chunk}" + (f" batch {b + 1}/{nb}" if nb > 1 else "")
            outs.append(to_uint8_nhwc(self._optimise(lab, derive_seed(seed, "inversion", chunk, b), desc)))
        images = np.concatenate(outs) if outs else np.zeros((0, *self.ctx.resolution, self.ctx.channels), np.uint8)
        result = {}
        for r in requests:
            rows = [k for k, (c, _) in enumerate(order) if c == r.class_id]
            result[r.class_id] = images[rows]
        return result
