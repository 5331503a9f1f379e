"""Backdoor triggers, poisoning and malicious update modifiers.

Attacks are data: a :class:`TriggerSpec` (what the trigger looks like) applied by a few small
functions. Images are float NCHW tensors in [0, 1] here.

* BadNets (Gu et al., 2017, https://arxiv.org/abs/1708.06733): a small patch at a fixed position.
* Blend (Chen et al., 2017, https://arxiv.org/abs/1712.05526): x' = (1−α)·x + α·pattern.
* DBA (Xie et al., ICLR 2020, https://openreview.net/forum?id=rkgyS0VFvr): the BadNets patch split
  into ``dba-parts`` pieces, one per colluding attacker; the test trigger is the full patch.
* Model replacement (Bagdasaryan et al., AISTATS 2020, https://arxiv.org/abs/1807.00459): the
  update is boosted by ``boost-factor``.
* Norm-constrained PGD (Sun et al., 2019, https://arxiv.org/abs/1911.07963): the local model is
  projected back into an L2 ball of radius ``pgd-radius`` around the global model.
* Neurotoxin (Zhang et al., ICML 2022, https://arxiv.org/abs/2206.10341): the attacker changes only
  coordinates that benign clients rarely change. The benign update is estimated as (current global −
  previous global); the ``neurotoxin-topk`` share of coordinates with the largest |estimate| is
  frozen and every gradient step is projected onto the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fltask.config import RunConfig


@dataclass(frozen=True)
class TriggerSpec:
    """A trigger: ``kind`` in {badnets, blend, dba}; patch geometry or blend pattern."""

    kind: str
    target: int
    size: int
    position: str
    pattern: str
    blend_alpha: float
    blend_pattern: str
    dba_parts: int
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, image_size: int) -> "TriggerSpec":
        size = cfg.trigger_size or max(2, round(image_size / 8))
        return cls(
            kind=cfg.attack,
            target=cfg.attack_target,
            size=min(size, image_size),
            position=cfg.trigger_position,
            pattern=cfg.trigger_pattern,
            blend_alpha=cfg.blend_alpha,
            blend_pattern=cfg.blend_pattern,
            dba_parts=cfg.dba_parts,
            seed=cfg.seed,
        )


def patch_origin(spec: TriggerSpec, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of the patch; a 1-px margin from the border."""
    s = spec.size
    m = 1 if max(height, width) > 2 * s + 2 else 0
    rows = {"top": m, "bottom": height - s - m, "center": (height - s) // 2}
    cols = {"left": m, "right": width - s - m, "center": (width - s) // 2}
    if spec.position == "center":
        return rows["center"], cols["center"]
    v, h = spec.position.split("-")
    return rows[v], cols[h]


def patch_pattern(spec: TriggerSpec, channels: int) -> torch.Tensor:
    """The patch values [C, s, s] in [0, 1]."""
    s = spec.size
    if spec.pattern == "white":
        pat = torch.ones(s, s)
    elif spec.pattern == "checkerboard":
        i = torch.arange(s)
        pat = ((i[:, None] + i[None, :]) % 2 == 0).float()
    else:
        g = torch.Generator().manual_seed(spec.seed + 11)
        pat = (torch.rand(s, s, generator=g) > 0.5).float()
    return pat.expand(channels, s, s).clone()


def patch_mask(spec: TriggerSpec, height: int, width: int, piece: int | None = None) -> torch.Tensor:
    """[H, W] mask of the patch, or of DBA piece ``piece`` (row-major quarters/halves of the patch)."""
    mask = torch.zeros(height, width)
    r0, c0 = patch_origin(spec, height, width)
    s = spec.size
    mask[r0 : r0 + s, c0 : c0 + s] = 1.0
    if piece is None:
        return mask
    sub = torch.zeros_like(mask)
    half = max(s // 2, 1)
    if spec.dba_parts == 2:
        rows = [(r0, r0 + half), (r0 + half, r0 + s)]
        sub[rows[piece % 2][0] : rows[piece % 2][1], c0 : c0 + s] = 1.0
    else:
        rr = [(r0, r0 + half), (r0 + half, r0 + s)][(piece % 4) // 2]
        cc = [(c0, c0 + half), (c0 + half, c0 + s)][(piece % 4) % 2]
        sub[rr[0] : rr[1], cc[0] : cc[1]] = 1.0
    return sub * mask


def blend_pattern(spec: TriggerSpec, channels: int, height: int, width: int) -> torch.Tensor:
    """The full-image blend pattern [C, H, W] in [0, 1] (fixed by the seed)."""
    if spec.blend_pattern == "stripes":
        j = torch.arange(width).float()
        pat = (0.5 + 0.5 * torch.sin(j * 2.0)).expand(height, width)
        return pat.expand(channels, height, width).clone()
    g = torch.Generator().manual_seed(spec.seed + 13)
    return torch.rand(channels, height, width, generator=g)


def apply_trigger(x: torch.Tensor, spec: TriggerSpec, piece: int | None = None) -> torch.Tensor:
    """Return triggered copies of ``x`` (float NCHW in [0, 1]). ``piece`` selects a DBA piece."""
    _, c, h, w = x.shape
    if spec.kind == "blend":
        pat = blend_pattern(spec, c, h, w).to(x)
        return (1 - spec.blend_alpha) * x + spec.blend_alpha * pat
    if spec.kind not in ("badnets", "dba"):
        raise ValueError(f"no trigger for attack {spec.kind!r}")
    mask = patch_mask(spec, h, w, piece if spec.kind == "dba" else None).to(x)
    full = torch.zeros(c, h, w, dtype=x.dtype, device=x.device)
    r0, c0 = patch_origin(spec, h, w)
    full[:, r0 : r0 + spec.size, c0 : c0 + spec.size] = patch_pattern(spec, c).to(x)
    return x * (1 - mask) + full * mask


def poison_batch(
    x: torch.Tensor, y: torch.Tensor, spec: TriggerSpec, rate: float, generator: torch.Generator, piece: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trigger a ``rate`` share of the batch and relabel those samples to the target."""
    n = len(y)
    k = int(round(rate * n))
    if k == 0:
        return x, y
    idx = torch.randperm(n, generator=generator)[:k]
    x, y = x.clone(), y.clone()
    x[idx] = apply_trigger(x[idx], spec, piece)
    y[idx] = spec.target
    return x, y


# ---------------------------------------------------------------------------- update modifiers
def _trainable_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and "running_" not in k]


def project_to_ball(model: torch.nn.Module, global_state: dict[str, torch.Tensor], radius: float) -> float:
    """Project the model into the L2 ball of ``radius`` around ``global_state``; returns the norm before."""
    with torch.no_grad():
        state = model.state_dict()
        keys = _trainable_keys(state)
        norm = torch.sqrt(sum(((state[k] - global_state[k]) ** 2).sum() for k in keys)).item()
        if norm > radius > 0:
            scale = radius / norm
            for k in keys:
                state[k].copy_(global_state[k] + (state[k] - global_state[k]) * scale)
    return norm


def boost_update(state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Model replacement: w_t + factor · (w − w_t) on float tensors."""
    if factor == 1.0:
        return state
    return {
        k: (global_state[k] + factor * (v - global_state[k])) if k in _trainable_keys(state) else v
        for k, v in state.items()
    }


def benign_update_estimate(
    global_state: dict[str, torch.Tensor], previous_global: dict[str, torch.Tensor] | None, keys: list[str]
) -> dict[str, torch.Tensor]:
    """Neurotoxin's estimate of the benign update on ``keys``.

    Parameters
    ----------
    global_state : dict of str to Tensor
        The global model this round.
    previous_global : dict of str to Tensor or None
        The global model the client saw before (its last participation). ``None`` (first
        participation) or a mismatching key set: the global weights themselves stand in, so the
        attacker avoids the largest weights.
    keys : list of str
        Parameter names to cover (trainable parameters, no BatchNorm statistics).
    """
    usable = previous_global is not None and all(
        k in previous_global and previous_global[k].shape == global_state[k].shape for k in keys
    )
    if not usable:
        return {k: global_state[k].detach().float().clone() for k in keys}
    return {k: (global_state[k].detach().float() - previous_global[k].detach().float()) for k in keys}


def neurotoxin_mask(benign_update: dict[str, torch.Tensor], topk: float) -> dict[str, torch.Tensor]:
    """Float 0/1 masks: 0 on the ``topk`` share of coordinates with the largest |benign update|.

    The ranking is global over all tensors (as in the paper's code). Exactly
    ``round(topk · n)`` of the ``n`` coordinates are excluded (ties broken by ``torch.topk``).

    Parameters
    ----------
    benign_update : dict of str to Tensor
        The estimated benign update per parameter.
    topk : float
        Share of coordinates excluded, in [0, 1); 0 keeps everything.
    """
    if not 0.0 <= topk < 1.0:
        raise ValueError(f"run-config key 'neurotoxin-topk' must lie in [0, 1), got {topk!r}")
    keys = list(benign_update)
    flat = torch.cat([benign_update[k].reshape(-1).abs().float() for k in keys]) if keys else torch.zeros(0)
    keep = torch.ones_like(flat)
    n_out = int(round(topk * flat.numel()))
    if n_out > 0:
        keep[torch.topk(flat, n_out).indices] = 0.0
    out, start = {}, 0
    for k in keys:
        n = benign_update[k].numel()
        out[k] = keep[start : start + n].reshape(benign_update[k].shape)
        start += n
    return out


def mask_gradients(model: torch.nn.Module, mask: dict[str, torch.Tensor], weight_decay: float = 0.0) -> None:
    """Project the gradients onto ``mask`` in place (Neurotoxin), weight decay folded in first.

    Weight decay is added to the gradient here (the optimiser then runs without it), so masked
    coordinates receive no decay either and stay exactly at the global value.
    """
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if weight_decay:
            p.grad.add_(p.detach(), alpha=weight_decay)
        if name in mask:
            p.grad.mul_(mask[name].to(p.grad))


# ---------------------------------------------------------------------------- who attacks
def malicious_partitions(cfg: RunConfig, server_round: int) -> frozenset[int]:
    """Partition ids that attack in ``server_round`` (fixed for the run or re-drawn each round)."""
    if cfg.attack == "none" or server_round < cfg.attack_start_round:
        return frozenset()
    if cfg.malicious_id_set:
        return cfg.malicious_id_set
    m = cfg.num_attackers
    if m == 0:
        return frozenset()
    seed = cfg.seed if cfg.attacker_sampling == "fixed" else cfg.seed * 100_003 + server_round
    rng = np.random.default_rng(seed + 404)
    return frozenset(int(i) for i in rng.choice(cfg.num_clients, size=m, replace=False))


def dba_piece(cfg: RunConfig, partition_id: int, server_round: int) -> int:
    """The DBA piece of an attacker: its rank among the round's attackers modulo the parts."""
    ranks = sorted(malicious_partitions(cfg, server_round))
    return ranks.index(partition_id) % cfg.dba_parts if partition_id in ranks else 0
