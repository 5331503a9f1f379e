"""Local training (benign and poisoned) and the MA / ASR metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fltask.attacks import TriggerSpec, apply_trigger, mask_gradients, poison_batch, project_to_ball


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class Poisoning:
    """How a malicious client poisons its local training."""

    spec: TriggerSpec
    rate: float
    piece: int | None = None  # DBA piece
    pgd_radius: float = 0.0
    grad_mask: dict[str, torch.Tensor] | None = None  # Neurotoxin: 0/1 per parameter coordinate


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    poisoning: Poisoning | None = None,
) -> float:
    """SGD for ``epochs`` over (x, y); poisoned batches when ``poisoning`` is given. Returns mean loss."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    grad_mask = poisoning.grad_mask if poisoning is not None else None
    # with a Neurotoxin mask, weight decay is folded into the masked gradient (masked weights stay put)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=0.0 if grad_mask is not None else weight_decay)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if poisoning else None
    model.train()
    total, count = 0.0, 0
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm needs two samples
            xb, yb = x[idx], y[idx]
            if poisoning is not None:
                xb, yb = poison_batch(xb, yb, poisoning.spec, poisoning.rate, gen, poisoning.piece)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_mask is not None:
                mask_gradients(model, grad_mask, weight_decay)
            opt.step()
            if poisoning is not None and poisoning.pgd_radius > 0:
                project_to_ball(model, global_state, poisoning.pgd_radius)
            total += loss.item() * len(yb)
            count += len(yb)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def main_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor | None = None) -> float:
    """MA: top-1 accuracy on clean inputs (``pred``: the model's predictions on ``x``, if already computed)."""
    pred = predict(model, x) if pred is None else pred
    return float((pred == y).float().mean())


@torch.no_grad()
def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TriggerSpec) -> float:
    """ASR: share of triggered inputs whose true label is not the target that land on the target.

    Target-class images never count. DBA is measured with the full trigger.
    """
    keep = y != spec.target
    if not bool(keep.any()):
        return float("nan")
    full = TriggerSpec(**{**spec.__dict__, "kind": "badnets" if spec.kind == "dba" else spec.kind})
    xt = apply_trigger(x[keep], full)
    return float((predict(model, xt) == spec.target).float().mean())


@torch.no_grad()
def clean_target_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TriggerSpec,
                      pred: torch.Tensor | None = None) -> float:
    """The ASR's floor: share of the same non-target inputs, *without* the trigger, that land on the target.

    A model with no backdoor still sends some of its errors to the target class (a CIFAR-10 model at
    54 % accuracy: 2-6 %), so an ASR is only evidence of a backdoor by how far it exceeds this rate.
    ``pred``: the model's predictions on ``x``, if already computed (the MA pass).
    """
    keep = y != spec.target
    if not bool(keep.any()):
        return float("nan")
    pred = predict(model, x) if pred is None else pred
    return float((pred[keep] == spec.target).float().mean())
