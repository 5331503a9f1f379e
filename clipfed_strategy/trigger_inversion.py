"""Trigger reconstruction from flagged client models, and the bank that feeds it to distillation.

An extension of the reconstruction (not in the CLIP-Fed abstract; on with ``invert-enabled=true``).

Why. The frequency-augmented server set covers *generic* trigger shapes (random patches, blends,
high-frequency noise). Distillation on it removes a backdoor that was implanted without any
pressure from the defence (a FedAvg-trained model: ASR 100 % → 2 % in one pass, benchmarks/README.md),
but not one that co-evolved with it: when an attacker slips through screening in some rounds and the
distillation of the other rounds teaches "random patches change nothing", the model learns to tell
*the* trigger from random patches, and one distillation then moves ASR only from 73 % to 66 %. What
distillation needs is the actual trigger.

How. Screening already names a suspicious client model and its suspected target class c*
(:func:`clipfed_strategy.screening.behaviour_scores`). Following Neural Cleanse (Wang et al., S&P
2019, https://ieeexplore.ieee.org/document/8835365), the server optimises a mask m ∈ [0,1]^{H×W}
and a pattern p ∈ [0,1]^{C×H×W} so that stamping them on its own clean images,
x' = (1 − m)·x + m·p, makes that model answer c*, with an L1 price on the mask:

    min_{m,p}  CE(f_flagged(x'), c*) + λ_ref · CE(f_ref(x'), f_ref(x)) + λ_mask · mean(m)

The middle term is what makes the reconstruction *specific*: without it, the optimiser finds a
universal adversarial patch of the shared architecture (on CIFAR-10 such patches of 2–5 % of the
image also sent benign client models to c*, so they were useless as screening probes). With the
round's global model f_ref as the reference, which must keep its own clean predictions, only what
the flagged model learnt on top of the global model (its backdoor) can flip it cheaply.
A reconstruction whose flip-rate gap (flagged model minus reference) reaches ``min_flip`` is kept in a
:class:`TriggerBank` (the ``bank_size`` most recent). Every distillation then adds, per banked
trigger, the server's clean rows stamped with it, with their clean labels and the aggregated
model's predictions on the *unstamped* source as the self-anchor target: "answer as if the trigger
were not there". The bank persists across rounds, so a round in which every attacker passes
screening still distils the triggers reconstructed earlier. Optionally (``invert-screen``) the
banked triggers also become an extra screening probe group, so the same trigger is recognised in
later rounds. No client sample is used: the inversion runs on the server's synthesised images.

Only the flagged model is inverted, so a benign false positive costs one inversion whose result
(an adversarial patch the benign model is not very sensitive to) usually fails the ``min_flip`` gate;
if it passes, distilling invariance to it does no harm beyond the extra rows.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipfed_strategy.features import eval_mode

log = logging.getLogger(__name__)


class InversionConfigError(ValueError):
    """A trigger-inversion setting outside its allowed values."""


@dataclass
class InversionConfig:
    """Trigger reconstruction settings (run-config keys ``invert-*``).

    Parameters
    ----------
    enabled : bool, default False
        Reconstruct triggers from flagged client models and distil invariance to them. Off by
        default: it removes a backdoor the server set does not cover on digits (tests), but on
        CIFAR-10 it has not yet been shown to lower the final ASR, and each inversion costs about
        as much as a client's local epoch on CPU (benchmarks/README.md).
    steps : int, default 150
        Adam steps per reconstruction.
    batch_size : int, default 128
        Clean server rows per step (drawn from the rows whose label is not the target).
    lr : float, default 0.1
        Adam learning rate on the mask and pattern logits.
    mask_l1 : float, default 10.0
        λ_mask, the price of the mask's mean value (a 4×4 patch on 32×32 images has mean 0.016).
    ref_weight : float, default 1.0
        λ_ref, the weight of the reference model's "keep your clean predictions" term (0 = plain
        Neural Cleanse on the flagged model alone).
    min_flip : float, default 0.5
        Keep a reconstruction only if the share of non-target clean rows it sends to the target
        on the flagged model exceeds that share on the reference by at least this much.
    bank_size : int, default 4
        Most recent kept triggers used by distillation (and screening when ``screen`` is on).
    max_per_round : int, default 2
        Flagged models inverted per round (highest suspicion first).
    rows_per_trigger : int, default 0
        Clean rows stamped per banked trigger in each distillation (0 = all non-target clean rows).
    screen : bool, default False
        Also screen with the banked triggers (an extra probe group for the collapse score). Off by
        default: on CIFAR-10 the reconstructed patches also sent benign client models to the target
        (collapse 0.3–0.9), so no attacker was flagged in the rounds after they were banked
        (benchmarks/README.md); on digits they separate the backdoored client cleanly.
    """

    enabled: bool = False
    steps: int = 150
    batch_size: int = 128
    lr: float = 0.1
    mask_l1: float = 10.0
    ref_weight: float = 1.0
    min_flip: float = 0.5
    bank_size: int = 4
    max_per_round: int = 2
    rows_per_trigger: int = 0
    screen: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, f"invert-steps must be > 0, got {self.steps}"),
            (self.batch_size > 0, f"invert-batch must be > 0, got {self.batch_size}"),
            (self.lr > 0, f"invert-lr must be > 0, got {self.lr}"),
            (self.mask_l1 >= 0, f"invert-mask-l1 must be >= 0, got {self.mask_l1}"),
            (self.ref_weight >= 0, f"invert-ref-weight must be >= 0, got {self.ref_weight}"),
            (0.0 <= self.min_flip <= 1.0, f"invert-min-flip must be in [0, 1], got {self.min_flip}"),
            (self.bank_size > 0, f"invert-bank-size must be > 0, got {self.bank_size}"),
            (self.max_per_round > 0, f"invert-max-per-round must be > 0, got {self.max_per_round}"),
            (self.rows_per_trigger >= 0, f"invert-rows-per-trigger must be >= 0, got {self.rows_per_trigger}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InversionConfigError(message)


@dataclass
class Trigger:
    """A reconstructed trigger: stamp with ``(1 − mask)·x + mask·pattern``."""

    mask: Tensor  # [1, H, W] in [0, 1]
    pattern: Tensor  # [C, H, W] in [0, 1]
    target: int
    flip_rate: float  # share of non-target clean rows the flagged model sends to the target
    ref_flip_rate: float = 0.0  # the same share on the reference model
    round: int = 0
    client: str = ""

    @property
    def mask_mean(self) -> float:
        return float(self.mask.mean())

    def apply(self, x: Tensor) -> Tensor:
        m = self.mask.to(x.device, x.dtype)
        p = self.pattern.to(x.device, x.dtype)
        return ((1 - m) * x + m * p).clamp(0, 1)

    def state(self) -> dict[str, Any]:
        return {"mask": self.mask.detach().cpu().clone(), "pattern": self.pattern.detach().cpu().clone(),
                "target": int(self.target), "flip_rate": float(self.flip_rate),
                "ref_flip_rate": float(self.ref_flip_rate), "round": int(self.round),
                "client": str(self.client)}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> "Trigger":
        return cls(torch.as_tensor(s["mask"]).float(), torch.as_tensor(s["pattern"]).float(), int(s["target"]),
                   float(s["flip_rate"]), float(s.get("ref_flip_rate", 0.0)), int(s.get("round", 0)),
                   str(s.get("client", "")))


def invert_trigger(model: nn.Module, x: Tensor, y: Tensor, target: int, cfg: InversionConfig | None = None,
                   seed: int = 0, reference: nn.Module | None = None) -> Trigger:
    """Reconstruct the trigger that sends ``model``'s predictions on ``x`` to ``target``.

    Parameters
    ----------
    model : nn.Module
        The (suspected backdoored) model; used in eval mode, its weights are not changed.
    x : Tensor ``[N, C, H, W]``
        Clean images in [0, 1] (the server's clean rows).
    y : Tensor ``[N]``
        Their labels; rows of the target class are not used.
    target : int
        The suspected target class.
    cfg : InversionConfig or None
    seed : int
        Seeds the initial pattern and the batch order.
    reference : nn.Module or None
        The model that must keep its clean predictions under the trigger (the round's global
        model); ``None`` or ``cfg.ref_weight`` 0 = no reference term.
    """
    cfg = cfg or InversionConfig()
    if x.dim() != 4 or len(x) != len(y):
        raise ValueError(f"x must be [N, C, H, W] with one label per row, got {tuple(x.shape)} and {tuple(y.shape)}")
    keep = torch.nonzero(y != target).flatten()
    if len(keep) == 0:
        raise ValueError(f"no clean rows outside the target class {target} to invert on")
    device = next(model.parameters()).device
    xs = x[keep].to(device).float()
    _, c, h, w = xs.shape
    gen = torch.Generator().manual_seed(seed)
    mask_logit = torch.full((1, h, w), -3.0, device=device, requires_grad=True)
    pattern_logit = (torch.randn((c, h, w), generator=gen) * 0.5).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr)
    tgt = torch.full((min(cfg.batch_size, len(xs)),), int(target), device=device, dtype=torch.long)
    use_ref = reference is not None and cfg.ref_weight > 0
    models = [model] + ([reference] if reference is not None else [])
    grad_flags = [[p.requires_grad for p in mod.parameters()] for mod in models]
    for mod in models:
        for p in mod.parameters():
            p.requires_grad_(False)
    try:
        with ExitStack() as stack:
            for mod in models:
                stack.enter_context(eval_mode(mod))
            ref_clean = None
            if use_ref:
                with torch.no_grad():
                    ref_clean = torch.cat([reference(xs[b0 : b0 + 512]).argmax(1) for b0 in range(0, len(xs), 512)])
            for _ in range(cfg.steps):
                idx = torch.randint(len(xs), (len(tgt),), generator=gen).to(device)
                m = torch.sigmoid(mask_logit)
                p = torch.sigmoid(pattern_logit)
                xb = (1 - m) * xs[idx] + m * p
                loss = F.cross_entropy(model(xb), tgt) + cfg.mask_l1 * m.mean()
                if use_ref:
                    loss = loss + cfg.ref_weight * F.cross_entropy(reference(xb), ref_clean[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                m = torch.sigmoid(mask_logit).detach()
                p = torch.sigmoid(pattern_logit).detach()
                flips = [0 for _ in models]
                for b0 in range(0, len(xs), 512):
                    xb = (1 - m) * xs[b0 : b0 + 512] + m * p
                    for j, mod in enumerate(models):
                        flips[j] += int((mod(xb).argmax(1) == target).sum())
    finally:
        for mod, flags in zip(models, grad_flags):
            for p_, flag in zip(mod.parameters(), flags):
                p_.requires_grad_(flag)
    return Trigger(m.cpu(), p.cpu(), int(target), flips[0] / len(xs),
                   flips[1] / len(xs) if reference is not None else 0.0)


class TriggerBank:
    """The most recent ``size`` kept reconstructions (persisted in the defence's checkpoint state)."""

    def __init__(self, size: int = 4) -> None:
        self.size = int(size)
        self.triggers: list[Trigger] = []

    def __len__(self) -> int:
        return len(self.triggers)

    def add(self, trigger: Trigger) -> None:
        self.triggers.append(trigger)
        self.triggers = self.triggers[-self.size :]

    def stamped_rows(self, x_clean: Tensor, y_clean: Tensor, rows_per_trigger: int = 0,
                     seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Clean rows stamped with each banked trigger.

        Returns ``(images, source_positions, trigger_index)``: the stamped images, for each the
        position of its clean source in ``x_clean``, and which banked trigger it carries. Rows of a
        trigger's own target class are skipped (the trigger cannot flip them).
        """
        images, sources, which = [], [], []
        gen = torch.Generator().manual_seed(seed)
        for t, trig in enumerate(self.triggers):
            pos = torch.nonzero(y_clean != trig.target).flatten()
            if rows_per_trigger and len(pos) > rows_per_trigger:
                pos = pos[torch.randperm(len(pos), generator=gen)[:rows_per_trigger].to(pos.device)]
            images.append(trig.apply(x_clean[pos]))
            sources.append(pos)
            which.append(torch.full((len(pos),), t, dtype=torch.long, device=pos.device))
        if not images:
            empty = x_clean[:0]
            return empty, torch.zeros(0, dtype=torch.long, device=x_clean.device), torch.zeros(0, dtype=torch.long, device=x_clean.device)
        return torch.cat(images), torch.cat(sources), torch.cat(which)

    def state_dict(self) -> list[dict[str, Any]]:
        return [t.state() for t in self.triggers]

    def load_state_dict(self, state: list[Mapping[str, Any]]) -> None:
        self.triggers = [Trigger.from_state(s) for s in state][-self.size :]


