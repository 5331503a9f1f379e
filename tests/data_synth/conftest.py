"""Shared fixtures: sklearn digits as uint8 NHWC and a tiny oracle teacher with the Teacher interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def digits():
    """``(images uint8 [N,8,8,1], labels int64)`` for all 1,797 sklearn digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images / 16.0 * 255.0, 0, 255).round().astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


class _Features(nn.Module):
    """Fixed random conv + BatchNorm (running stats from the data) + ReLU, centred: 1,024-d."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16, momentum=None)  # cumulative average: exact data statistics
        with torch.no_grad():
            self.bn.train()
            self.bn(self.conv(x))
            self.bn.eval()
            self.register_buffer("mu", self._raw(x).mean(0))

    def _raw(self, x):
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        return F.relu(self.bn(self.conv(x))).flatten(1)

    def forward(self, x):
        return F.normalize(self._raw(x) - self.mu, dim=-1)


class FakeTeacher:
    """Looks like ``clipfed_strategy.teacher.Teacher`` (identity, is_standin, class_names, embed_dim,
    text_prototypes, logit_scale, device, model, encode_images, zero_shot_logits) plus
    ``encode_images_with_grad``: a nearest-class-mean cosine classifier on random conv features
    of 8x8 digits."""

    def __init__(self, net: _Features, prototypes: torch.Tensor, class_names, identity="fake:oracle-digits"):
        self.model = net.eval().requires_grad_(False)
        self.identity = identity
        self.is_standin = True
        self.class_names = list(class_names)
        self.text_prototypes = F.normalize(prototypes, dim=-1)
        self.embed_dim = self.text_prototypes.shape[1]
        self.logit_scale = 30.0
        self.device = torch.device("cpu")

    def encode_images_with_grad(self, x):
        x = x.float()
        return self.model(x if x.shape[-2:] == (8, 8) else F.interpolate(x, size=(8, 8), mode="area"))

    @torch.no_grad()
    def encode_images(self, x):
        return self.encode_images_with_grad(x)

    @torch.no_grad()
    def zero_shot_logits(self, x):
        return self.logit_scale * self.encode_images(x) @ self.text_prototypes.T


@pytest.fixture(scope="session")
def oracle_teacher(digits):
    """A FakeTeacher built from 1,000 digits in well under a second (about 88 % on the other 797)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels = digits
    x = torch.from_numpy(images[:1000]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels[:1000])
    net = _Features(x)
    with torch.no_grad():
        emb = net(x)
        protos = torch.stack([emb[y == c].mean(0) for c in range(10)])
    return FakeTeacher(net, protos, DIGITS)


class ListGenerator:
    """A generator that serves fixed arrays per class; counts calls; optionally fails on a chunk."""

    name = "list"
    joint = False

    def __init__(self, per_class: dict[int, np.ndarray], fail_on_chunk: int | None = None, joint: bool = False):
        self.per_class = per_class
        self.fail_on_chunk = fail_on_chunk
        self.joint = joint
        self.calls: list[tuple[int, tuple]] = []

    def capacity(self, class_id):
        return len(self.per_class[class_id])

    def describe(self):
        return {"name": self.name, "provenance": "test arrays", "config": {"sizes": [len(v) for v in self.per_class.values()]}}

    def generate(self, requests, chunk, seed):
        if self.fail_on_chunk is not None and chunk >= self.fail_on_chunk:
            raise RuntimeError(f"simulated crash in chunk {chunk}")
        self.calls.append((chunk, tuple((r.class_id, r.start, r.count) for r in requests)))
        return {r.class_id: self.per_class[r.class_id][r.start : r.start + r.count] for r in requests}


@pytest.fixture
def list_generator_cls():
    return ListGenerator


@pytest.fixture(scope="session")
def digits_by_class(digits):
    images, labels = digits
    return {c: images[labels == c] for c in range(10)}
