"""Fixtures for the CLIP-Fed core and adapter tests: tiny server datasets built from sklearn digits,
stand-in teacher outputs built from the true labels (no real teacher), user-style models and a
small Non-IID digits federation whose clients can be trained inside a ClientApp.

Nothing here reads ../shared: every array comes from ``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from clipfed_strategy.config import CLIPFedConfig, ScreeningConfig
from clipfed_strategy.core import CLIPFedDefense
from clipfed_strategy.distillation import DistillConfig
from clipfed_strategy.freq_augment import augment_dataset
from clipfed_strategy.server_dataset import ServerDataset

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EMBED_DIM = 16


def digits_fl():
    """The shared digits backdoor problem (``_digits_fl.py``), loaded by path once."""
    from testkit import load_sibling

    return load_sibling(__file__, "_digits_fl.py", "clipfed_strategy_tests_digits_fl")


# --------------------------------------------------------------------------- user-style model


class TinyNet(nn.Module):
    """A model as a user would write it: named attributes, own forward, BatchNorm (int64 buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def tiny_net(seed: int = 0) -> TinyNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet()


# --------------------------------------------------------------------------- server datasets


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC (the stored image convention)."""
    return np.round(x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def teacher_arrays(sds: ServerDataset, seed: int = 0, scale: float = 5.0):
    """A knowledgeable stand-in teacher: logits peaked on each row's clean label, embeddings near
    their class prototype, random unit text prototypes. Returns ``(logits, embeddings, prototypes)``."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(len(sds.class_names), EMBED_DIM, generator=g), dim=1)
    y = torch.from_numpy(sds.labels)
    logits = scale * F.one_hot(y, len(sds.class_names)).float()
    emb = F.normalize(protos[y] + 0.1 * torch.randn(len(y), EMBED_DIM, generator=g), dim=1)
    return logits.numpy(), emb.numpy(), protos.numpy()


def make_defense(model: nn.Module, sds: ServerDataset, *, screen: dict | None = None, distill: dict | None = None,
                 **top) -> CLIPFedDefense:
    """A CPU ``CLIPFedDefense`` with the stand-in teacher outputs of :func:`teacher_arrays`."""
    logits, emb, protos = teacher_arrays(sds)
    cfg = CLIPFedConfig(screen=ScreeningConfig(**(screen or {})), distill=DistillConfig(**(distill or {})),
                        device="cpu", **top)
    return CLIPFedDefense(model, sds, logits, emb, protos, {"identity": "test:one-hot-labels", "is_standin": True}, cfg)


@pytest.fixture(scope="session")
def small_server_set() -> ServerDataset:
    """60 clean digits (the last rows of sklearn digits, 6 per class) + ``hf-patch`` and ``hf-noise``
    variants from :mod:`clipfed_strategy.freq_augment`, keeping the clean labels: 180 rows."""
    d = load_digits()
    rows = np.concatenate([np.flatnonzero(d.target == c)[-6:] for c in range(10)])
    images = np.round(d.images[rows] / 16.0 * 255).astype(np.uint8)[..., None]
    clean = ServerDataset(images, d.target[rows], np.zeros(len(rows)), np.arange(len(rows)), CLASS_NAMES)
    return augment_dataset(clean, "hf-patch,hf-noise", seed=0)


# --------------------------------------------------------------------------- a Non-IID digits federation


@dataclass
class DigitsFederation:
    """A small BadNets federation on digits (same data and client recipes as ``_digits_fl``).

    ``train_client(i, state)`` fine-tunes ``state`` on partition ``i`` as the client of role
    ``roles[i]`` would (6 epochs; the ``backdoor`` client poisons 30% of its batches with a 2×2
    bottom-right patch → class 0). ``server_set`` holds the 300 held-out clean digits and 5
    patched copies of each (random patches and bright corner patches), all with clean labels.
    """

    roles: tuple
    global_state: dict
    partitions: list
    x_pool: torch.Tensor
    y_pool: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    server_set: ServerDataset
    seed: int

    def train_client(self, i: int, state) -> nn.Module:
        P = digits_fl()
        model = P.make_cnn()
        model.load_state_dict(state)
        idx = self.partitions[i]
        poison = 0.3 if self.roles[i] == "backdoor" else 0.0
        return P.train(model, self.x_pool[idx], self.y_pool[idx], epochs=6, seed=self.seed + 1 + i, poison=poison)


def build_federation(roles=("iid", "iid", "iid", "skewed", "skewed", "backdoor"), seed: int = 3) -> DigitsFederation:
    """Mirror of ``_digits_fl.build_problem`` that stops before client training (clients train in
    the test's ClientApp instead); with the same seed it yields the same client models."""
    P = digits_fl()
    torch.set_num_threads(1)
    digits = load_digits()
    x_all = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y_all = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    x_all, y_all = x_all[perm], y_all[perm]
    x_server, y_server = x_all[:300], y_all[:300]
    x_test, y_test = x_all[300:700], y_all[300:700]
    x_pool, y_pool = x_all[700:], y_all[700:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        global_model = P.train(P.make_cnn(), x_pool[:300], y_pool[:300], epochs=4, seed=seed)
    rng = np.random.default_rng(seed)
    partitions = []
    for role in roles:
        if role == "skewed":
            classes = rng.choice(10, size=2, replace=False)
            partitions.append(torch.nonzero(torch.isin(y_pool, torch.tensor(classes))).flatten())
        else:
            partitions.append(torch.tensor(rng.choice(len(x_pool), size=250, replace=False)))
    x_aug, aug_source, aug_variant = P.make_augmented(x_server, seed=seed + 100)
    n = len(x_server)
    server_set = ServerDataset(
        images=to_uint8_nhwc(torch.cat([x_server, x_aug])),
        labels=torch.cat([y_server, y_server[aug_source]]).numpy(),
        variants=torch.cat([torch.zeros(n, dtype=torch.long), aug_variant]).numpy(),
        source_index=torch.cat([torch.arange(n), aug_source]).numpy(),
        class_names=CLASS_NAMES,
        variant_names=["clean", "random-patch", "patch-tl", "patch-tr", "patch-bl", "patch-br"],
    )
    state = {k: v.clone() for k, v in global_model.state_dict().items()}
    return DigitsFederation(tuple(roles), state, partitions, x_pool, y_pool, x_test, y_test, server_set, seed)


@pytest.fixture(scope="session")
def digits_federation() -> DigitsFederation:
    return build_federation()
