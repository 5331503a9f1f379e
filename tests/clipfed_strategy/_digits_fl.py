"""A tiny federated backdoor problem on sklearn digits (8×8 grey), shared by the screening and
distillation tests. Not a test module; loaded by path from the tests that need it.

Round t of FedAvg is simulated: a global CNN is trained briefly on IID data, then K clients
fine-tune it: benign IID clients, benign clients that hold only two classes (strong label skew),
and one BadNets client (2×2 white patch in the bottom-right corner → class 0, poison rate 0.3).
The server holds a clean set D_s and trigger-like augmented copies D_a (random small patches at
random positions with random patterns, keeping the clean label), as the frequency augmentation
of method.md §4 would make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

TARGET = 0


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """BadNets trigger: 2×2 white patch in the bottom-right corner."""
    x = x.clone()
    x[:, :, -2:, -2:] = 1.0
    return x


def random_patches(
    x: torch.Tensor, seed: int, k_min: int = 2, k_max: int = 3, corner_prob: float = 0.5
) -> torch.Tensor:
    """hf-patch-like augmentation: one k×k patch (random binary, checkerboard or constant-bright
    pattern) per image, in a random corner with probability ``corner_prob``, else anywhere."""
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    n, _, h, w = x.shape
    for i in range(n):
        k = int(torch.randint(k_min, k_max + 1, (1,), generator=g))
        r = int(torch.randint(0, h - k + 1, (1,), generator=g))
        c = int(torch.randint(0, w - k + 1, (1,), generator=g))
        if float(torch.rand(1, generator=g)) < corner_prob:
            corner = int(torch.randint(0, 4, (1,), generator=g))
            r, c = (0 if corner < 2 else h - k), (0 if corner % 2 == 0 else w - k)
        kind = int(torch.randint(0, 3, (1,), generator=g))
        if kind == 0:
            patch = torch.randint(0, 2, (k, k), generator=g).float()
        elif kind == 1:
            patch = ((torch.arange(k)[:, None] + torch.arange(k)[None, :]) % 2).float()
        else:
            patch = torch.full((k, k), 0.7 + 0.3 * float(torch.rand(1, generator=g)))
        out[i, :, r : r + k, c : c + k] = patch
    return out


def train(model: nn.Module, x, y, epochs: int, seed: int, lr: float = 0.05, poison: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), 32):
            idx = order[b : b + 32]
            xb, yb = x[idx], y[idx]
            if poison > 0:
                m = torch.rand(len(idx), generator=g) < poison
                xb = xb.clone()
                xb[m] = add_trigger(xb[m])
                yb = torch.where(m, torch.full_like(yb, TARGET), yb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def attack_success(model, x, y) -> float:
    model.eval()
    keep = y != TARGET
    return float((model(add_trigger(x[keep])).argmax(1) == TARGET).float().mean())


@dataclass
class Problem:
    global_model: nn.Module
    clients: list  # list[nn.Module]
    roles: list  # list[str]: "iid", "skewed", "backdoor"
    x_server: torch.Tensor
    y_server: torch.Tensor
    x_aug: torch.Tensor
    aug_source: torch.Tensor
    aug_variant: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def build_problem(roles=("iid", "iid", "iid", "skewed", "skewed", "backdoor"), seed: int = 0) -> Problem:
    torch.set_num_threads(1)
    digits = load_digits()
    x_all = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y_all = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    x_all, y_all = x_all[perm], y_all[perm]
    x_server, y_server = x_all[:300], y_all[:300]
    x_test, y_test = x_all[300:700], y_all[300:700]
    x_pool, y_pool = x_all[700:], y_all[700:]

    torch.manual_seed(seed)
    global_model = train(make_cnn(), x_pool[:300], y_pool[:300], epochs=4, seed=seed)
    state = global_model.state_dict()

    rng = np.random.default_rng(seed)
    clients = []
    for i, role in enumerate(roles):
        if role == "skewed":
            classes = rng.choice(10, size=2, replace=False)
            idx = torch.nonzero(torch.isin(y_pool, torch.tensor(classes))).flatten()
        else:
            idx = torch.tensor(rng.choice(len(x_pool), size=250, replace=False))
        model = make_cnn()
        model.load_state_dict(state)
        poison = 0.3 if role == "backdoor" else 0.0
        clients.append(train(model, x_pool[idx], y_pool[idx], epochs=6, seed=seed + 1 + i, poison=poison))

    x_aug, aug_source, aug_variant = make_augmented(x_server, seed=seed + 100)
    return Problem(
        global_model, clients, list(roles), x_server, y_server, x_aug, aug_source, aug_variant,
        x_test, y_test,
    )


def corner_patch(x: torch.Tensor, corner: int, seed: int, k_min: int = 2, k_max: int = 3) -> torch.Tensor:
    """A bright k×k patch (value 0.7..1, k random per image) in one corner (0..3 = TL, TR, BL, BR)."""
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    n, _, h, w = x.shape
    for i in range(n):
        k = int(torch.randint(k_min, k_max + 1, (1,), generator=g))
        r, c = (h - k) * (corner // 2), (w - k) * (corner % 2)
        out[i, :, r : r + k, c : c + k] = 0.7 + 0.3 * float(torch.rand(1, generator=g))
    return out


def make_augmented(x: torch.Tensor, seed: int):
    """Trigger-like copies of every clean row, as variants: 1 = one random patch (anywhere or in a
    corner), 2..5 = a bright patch in corner 0..3. Returns (x_aug, source index, variant id)."""
    n = len(x)
    parts = [random_patches(x, seed)] + [corner_patch(x, c, seed + 1 + c) for c in range(4)]
    source = torch.arange(n).repeat(len(parts))
    variant = torch.arange(1, len(parts) + 1).repeat_interleave(n)
    return torch.cat(parts), source, variant
