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


class _Net(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, dim)
        self.protos = nn.Parameter(torch.randn(classes, dim))

    def embed(self, x):
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return F.normalize(self.fc(h.flatten(1)), dim=-1)


class FakeTeacher:
    """Looks like ``clipfed_strategy.teacher.Teacher`` (identity, is_standin, class_names, embed_dim,
    text_prototypes, logit_scale, device, model, encode_images, zero_shot_logits) plus
    ``encode_images_with_grad``; a cosine classifier trained on 8x8 digits."""

    def __init__(self, net: _Net, class_names, identity="fake:oracle-digits"):
        self.model = net.eval().requires_grad_(False)
        self.identity = identity
        self.is_standin = True
        self.class_names = list(class_names)
        self.text_prototypes = F.normalize(net.protos.detach(), dim=-1)
        self.embed_dim = self.text_prototypes.shape[1]
        self.logit_scale = 10.0
        self.device = torch.device("cpu")

    def _resize(self, x):
        return x if x.shape[-2:] == (8, 8) else F.interpolate(x, size=(8, 8), mode="area")

    def encode_images_with_grad(self, x):
        return self.model.embed(self._resize(x.float()))

    @torch.no_grad()
    def encode_images(self, x):
        return self.encode_images_with_grad(x)

    @torch.no_grad()
    def zero_shot_logits(self, x):
        return self.logit_scale * self.encode_images(x) @ self.text_prototypes.T


@pytest.fixture(scope="session")
def oracle_teacher(digits):
    """A FakeTeacher trained for ~2 s on 1,400 digits (about 87 % accurate on the other 397)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels = digits
    x = torch.from_numpy(images[:1400]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels[:1400])
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(80):
        logits = 10.0 * net.embed(x) @ F.normalize(net.protos, dim=-1).T
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return FakeTeacher(net, DIGITS)


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
