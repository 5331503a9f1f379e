"""Post-aggregation distillation of the global model towards CLIP (method.md §6; reconstruction).

After aggregation the server trains the global model θ (initialised at the aggregate θ̄) on its
synthetic set, whose augmented rows keep their *clean* labels, minimising

    L = λ_CE·CE(f_θ(x), y) + λ_KL·T²·KL(softmax(s_T(x_t)/T) ‖ softmax(f_θ(x)/T))
        + λ_PCL·PCL(normalize(h(φ_θ(x))), y, prototypes, τ) + λ_prox·‖θ − θ̄‖²
        + λ_self·T²·KL(softmax(f_θ̄(x_s)/T) ‖ softmax(f_θ(x)/T))

where s_T(x_t) are the teacher's logits on the row's clean source, f_θ̄(x_s) the aggregated model's
own logits on that clean source (frozen before the first step: the self-anchor keeps what the
federation learnt on real data while the augmented rows teach invariance to trigger-like
perturbations; an extension of the reconstruction, off when λ_self = 0), φ_θ the penultimate features
(:mod:`clipfed_strategy.features`) and h a projection head to the teacher's embedding width that
lives on the server across rounds (:class:`Distiller`). No target label ever appears, which breaks
the trigger → target link; the KL term to the clean-source teacher enforces trigger invariance.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipfed_strategy.features import PenultimateExtractor, eval_mode, last_linear
from clipfed_strategy.losses import kd_kl_loss, kl_per_sample, prototype_contrastive_loss

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
BN_MODES = ("frozen", "train")
SELF_GATES = ("all", "label", "teacher", "over")
TRAINABLE = ("all", "head", "last-k")
HEADS = ("linear", "mlp")


class DistillConfigError(ValueError):
    """A distillation setting outside its allowed values."""


@dataclass
class DistillConfig:
    """Settings of one distillation run (run-config keys ``distill.*``).

    Parameters
    ----------
    epochs : int, default 0
        Passes over the data (used when ``steps`` is 0).
    steps : int, default 30
        Exact number of optimiser steps (> 0 overrides ``epochs``; the data is reshuffled each pass).
        A fixed per-round budget, independent of the server set's size: on the digits default one
        epoch of the 8,000-row set (63 steps) dwarfed the clients' own local steps and cost 2
        accuracy points; 30 steps kept MA within 2 points of clean FedAvg on 5 of 5 seeds
        (benchmarks/README.md, "Session 5"). The CIFAR-10 configs pin one epoch (19 steps on 2,400 rows).
    batch_size : int, default 128
    lr : float, default 0.01
    momentum : float, default 0.9
        SGD momentum (ignored by Adam).
    weight_decay : float, default 5e-4
    optimizer : {"sgd", "adam"}, default "sgd"
    T : float, default 3.0
        KD temperature.
    tau : float, default 0.1
        PCL temperature.
    lambda_ce, lambda_kl, lambda_pcl, lambda_prox : float, defaults 0.0, 0.5, 0.001, 0.0
        Loss weights (PCL and its head are skipped when ``lambda_pcl`` is 0). The reconstruction's
        teacher-only setting is ``lambda_ce=1, lambda_kl=2, lambda_self=0``: with a weak teacher (the
        59 %-zero-shot CIFAR-10 stand-in) on synthetic images it cost up to 40 points of MA
        (benchmarks/README.md), hence the defaults lean on the self-anchor.
    lambda_self : float, default 2.0
        Weight of the self-anchor KL towards the aggregated model's own (temperature-T) predictions
        on each row's clean source; needs ``self_logits`` or ``source_index`` in
        :meth:`Distiller.distill`.
    self_gate : {"all", "label", "teacher", "over"}, default "all"
        Rows the self-anchor applies to. ``all``: every row. ``label``: only rows whose clean source
        the aggregated model assigns to the row's intended class; ``teacher``: only rows where it
        agrees with the teacher's top-1; ``over``: all but the rows it assigns, against their
        intended label, to a class it *over-predicts* (that class's share of its answers is at
        least ``self_gate_ratio`` times its share of the labels). Where a backdoor that got past
        screening already sends clean server images to its target (a Blend-backdoored CIFAR-10
        model does so on the noise-like synthesised rows), ``all`` anchors the model to that
        answer; a gate leaves those rows to the teacher and CE terms. ``label`` also un-anchors the
        model's ordinary errors, and with them the trigger invariance their augmented copies teach
        (a BadNets-backdoored CIFAR-10 model kept 4.3 % ASR after one distillation, 2.2 % with
        ``all``); ``over`` only touches the over-predicted class.
    self_gate_ratio : float, default 2.0
        Over-prediction ratio for ``self_gate="over"`` (> 1).
    bn : {"frozen", "train"}, default "frozen"
        ``frozen`` keeps BatchNorm layers in eval mode (running statistics from the clients stay).
    trainable : {"all", "head", "last-k"}, default "all"
        ``head``: only the last ``nn.Linear`` (the classifier); ``last-k``: the last ``last_k``
        modules that own parameters.
    last_k : int, default 2
    grad_clip : float, default 20.0
        Clip the global gradient norm of each step to this value (0 = off). Rows stamped with a
        reconstructed trigger start far from their targets (the backdoored model answers the target
        class with confidence), and unclipped steps on them can wreck the model (digits: accuracy
        0.92 → 0.14 with two banked triggers; 0.92 with the clip). On the CIFAR-10 lab model the clip
        changed MA by +1.0 point and ASR not at all (benchmarks/README.md).
    seed : int, default 0
        Seeds shuffling and any dropout; the caller varies it per round if it wants.
    amp : bool, default True
        float16 autocast + GradScaler when the model is on CUDA (always fp32 on CPU).
    """

    epochs: int = 0
    steps: int = 30
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    T: float = 3.0
    tau: float = 0.1
    lambda_ce: float = 0.0
    lambda_kl: float = 0.5
    lambda_pcl: float = 0.001
    lambda_prox: float = 0.0
    lambda_self: float = 2.0
    self_gate: str = "all"
    self_gate_ratio: float = 2.0
    bn: str = "frozen"
    trainable: str = "all"
    last_k: int = 2
    grad_clip: float = 20.0
    seed: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        checks = [
            (
                self.optimizer in OPTIMIZERS,
                f"distill.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
            ),
            (self.bn in BN_MODES, f"distill.bn must be one of {BN_MODES}, got {self.bn!r}"),
            (self.self_gate_ratio > 1, f"distill.self-gate-ratio must be > 1, got {self.self_gate_ratio}"),
            (
                self.self_gate in SELF_GATES,
                f"distill.self-gate must be one of {SELF_GATES}, got {self.self_gate!r}",
            ),
            (
                self.trainable in TRAINABLE,
                f"distill.trainable must be one of {TRAINABLE}, got {self.trainable!r}",
            ),
            (self.epochs >= 0 and self.steps >= 0, "distill.epochs and distill.steps must be >= 0"),
            (self.batch_size > 0, f"distill.batch must be > 0, got {self.batch_size}"),
            (self.lr > 0, f"distill.lr must be > 0, got {self.lr}"),
            (self.T > 0 and self.tau > 0, "distill.T and distill.tau must be > 0"),
            (self.last_k > 0, f"distill.last-k must be > 0, got {self.last_k}"),
            (self.grad_clip >= 0, f"distill.grad-clip must be >= 0, got {self.grad_clip}"),
            (
                min(self.lambda_ce, self.lambda_kl, self.lambda_pcl, self.lambda_prox, self.lambda_self) >= 0,
                "distill.lambda-* weights must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise DistillConfigError(message)


def _trainable_parameters(model: nn.Module, cfg: DistillConfig) -> list[nn.Parameter]:
    if cfg.trainable == "all":
        return [p for p in model.parameters()]
    if cfg.trainable == "head":
        return list(last_linear(model)[1].parameters())
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return [p for m in owners[-cfg.last_k :] for p in m.parameters(recurse=False)]


def _build_head(kind: str, d: int, embed_dim: int, hidden: int) -> nn.Sequential:
    if kind == "linear":
        return nn.Sequential(nn.Linear(d, embed_dim))
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))


class Distiller:
    """Server-side distillation state: the projection head h: d → D kept across rounds.

    Parameters
    ----------
    embed_dim : int
        D, the width of the teacher's embeddings / text prototypes.
    head : {"linear", "mlp"}, default "linear"
        ``mlp`` = Linear(d, hidden) → ReLU → Linear(hidden, D).
    hidden_dim : int or None, default None
        Hidden width of the MLP head (``None`` = d).
    feature_module : str or None, default None
        Where the student's features φ are taken (see :class:`PenultimateExtractor`).
    seed : int, default 0
        Seeds the head's initialisation (built at the first :meth:`distill`, when d is known).
    """

    def __init__(
        self,
        embed_dim: int,
        head: str = "linear",
        hidden_dim: int | None = None,
        feature_module: str | None = None,
        seed: int = 0,
    ) -> None:
        if head not in HEADS:
            raise DistillConfigError(f"distill head must be one of {HEADS}, got {head!r}")
        if embed_dim <= 0:
            raise DistillConfigError(f"embed_dim must be > 0, got {embed_dim}")
        self.embed_dim = int(embed_dim)
        self.head_kind = head
        self.hidden_dim = hidden_dim
        self.feature_module = feature_module
        self.seed = seed
        self.head: nn.Sequential | None = None

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Tensor]:
        """The head's tensors (empty before the first :meth:`distill` or :meth:`load_state_dict`)."""
        if self.head is None:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the head from :meth:`state_dict` (builds it from the stored shapes if needed)."""
        if not state:
            self.head = None
            return
        kind = "mlp" if "2.weight" in state else "linear"
        if kind != self.head_kind:
            raise DistillConfigError(f"stored head is {kind!r} but this Distiller uses {self.head_kind!r}")
        first = state["0.weight"]
        d = int(first.shape[1])
        hidden = int(first.shape[0]) if kind == "mlp" else 0
        out_dim = int(state["2.weight" if kind == "mlp" else "0.weight"].shape[0])
        if out_dim != self.embed_dim:
            raise DistillConfigError(
                f"stored head maps to {out_dim} dims, expected embed_dim={self.embed_dim}"
            )
        self.head = _build_head(kind, d, self.embed_dim, hidden)
        self.head.load_state_dict(state)

    def _ensure_head(self, d: int, device: torch.device) -> nn.Sequential:
        if self.head is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.head = _build_head(self.head_kind, d, self.embed_dim, self.hidden_dim or d)
        in_dim = self.head[0].in_features
        if in_dim != d:
            raise DistillConfigError(f"projection head expects {in_dim}-d features, the model gives {d}")
        self.head = self.head.to(device)
        return self.head

    # ---------------------------------------------------------------- training
    def distill(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        teacher_logits: Tensor,
        text_prototypes: Tensor | None,
        cfg: DistillConfig | None = None,
        self_logits: Tensor | None = None,
        source_index: Tensor | None = None,
    ) -> dict[str, float]:
        """Train ``model`` in place towards the teacher; returns mean losses and timing.

        Parameters
        ----------
        model : nn.Module
            The aggregated global model θ̄ (any device); trained in place. Every module's
            train/eval flag and every parameter's ``requires_grad`` are restored afterwards.
        x : Tensor ``[N, C, H, W]``
            Float images in [0, 1] (any device; moved batch by batch).
        labels : Tensor ``[N]`` int64
            Clean (generation) labels ŷ; augmented rows keep the label of their clean source.
        teacher_logits : Tensor ``[N, classes]``
            Teacher logits for each row's teacher input (its clean source by default).
        text_prototypes : Tensor ``[classes, D]`` or None
            Class prototypes for PCL; may be ``None`` only when ``cfg.lambda_pcl`` is 0.
        cfg : DistillConfig or None
            ``None`` = ``DistillConfig()``.
        self_logits : Tensor ``[N, classes]`` or None
            The self-anchor target: the aggregated model's logits on each row's clean source. When
            ``None`` and ``cfg.lambda_self`` > 0 they are computed here, before the first step, from
            ``model`` (eval mode) on ``x[source_index]``.
        source_index : Tensor ``[N]`` int64 or None
            For each row, the row of ``x`` holding its clean source (a clean row points at itself).
            Needed for the self-anchor when ``self_logits`` is not given: without the pairing the
            anchor would keep the model's predictions on the augmented rows themselves, trigger
            response included, so it is refused.

        Returns
        -------
        dict
            ``ce``, ``kl``, ``pcl``, ``prox``, ``self``, ``total`` (means over steps), ``steps``,
            ``samples``, ``seconds``.
        """
        cfg = cfg or DistillConfig()
        n = x.shape[0]
        if labels.shape[0] != n or teacher_logits.shape[0] != n:
            raise ValueError(
                f"x, labels and teacher_logits need the same number of rows, got {n}, "
                f"{labels.shape[0]}, {teacher_logits.shape[0]}"
            )
        if cfg.bn == "train" and n < 2:
            raise ValueError('distill.bn="train" needs at least 2 rows (BatchNorm batch statistics)')
        use_self = cfg.lambda_self > 0
        if use_self and self_logits is None:
            if source_index is None:
                raise ValueError(
                    "lambda_self > 0 needs self_logits or source_index (each row's clean source in x); "
                    "set lambda_self=0 to distil towards the teacher alone"
                )
            if source_index.shape != (n,):
                raise ValueError(f"source_index must have shape ({n},), got {tuple(source_index.shape)}")
            self_logits = own_logits(model, x, source_index)
        if use_self and self_logits.shape != teacher_logits.shape:
            raise ValueError(
                "self_logits of the same shape as teacher_logits are required when lambda_self > 0, got "
                f"{None if self_logits is None else tuple(self_logits.shape)}"
            )
        gate = (self_anchor_gate(self_logits, labels, teacher_logits, cfg.self_gate, cfg.self_gate_ratio)
                if use_self else None)
        use_pcl = cfg.lambda_pcl > 0
        if use_pcl and text_prototypes is None:
            raise ValueError("text_prototypes are required when lambda_pcl > 0")
        device = next(model.parameters()).device
        extractor = PenultimateExtractor(model, self.feature_module)
        start = time.perf_counter()
        if gate is not None:
            gate = gate.to(device)

        modes = [m.training for m in model.modules()]
        grad_flags = [p.requires_grad for p in model.parameters()]
        params = _trainable_parameters(model, cfg)
        trainable_ids = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        anchor = [p.detach().clone() for p in params] if cfg.lambda_prox > 0 else []

        head = None
        protos = None
        if use_pcl:
            head = self._ensure_head(_feature_dim(extractor, x, device), device)
            head.train()
            protos = text_prototypes.to(device).float()
            if protos.shape != (teacher_logits.shape[1], self.embed_dim):
                raise ValueError(
                    f"text_prototypes must be [classes={teacher_logits.shape[1]}, D={self.embed_dim}], "
                    f"got {tuple(protos.shape)}"
                )
        opt_params = params + (list(head.parameters()) if head is not None else [])
        optimizer = _make_optimizer(opt_params, cfg)
        use_amp = cfg.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()

        batches_per_pass = math.ceil(n / cfg.batch_size)
        total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * batches_per_pass
        gen = torch.Generator().manual_seed(cfg.seed)
        sums = {"ce": 0.0, "kl": 0.0, "pcl": 0.0, "prox": 0.0, "self": 0.0, "total": 0.0}
        steps = 0
        model.train()
        if cfg.bn == "frozen":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(cfg.seed)
                while steps < total_steps:
                    order = torch.randperm(n, generator=gen)
                    for b0 in range(0, n, cfg.batch_size):
                        if steps >= total_steps:
                            break
                        idx = order[b0 : b0 + cfg.batch_size]
                        if cfg.bn == "train" and idx.numel() < 2:
                            continue
                        xb = x[idx].to(device, non_blocking=True).float()
                        yb = labels[idx].to(device, non_blocking=True).long()
                        tb = teacher_logits[idx].to(device, non_blocking=True).float()
                        with autocast:
                            logits, feats = extractor(xb)
                            ce = F.cross_entropy(logits.float(), yb)
                            kl = kd_kl_loss(logits, tb, cfg.T)
                            pcl = (
                                prototype_contrastive_loss(head(feats.float()), yb, protos, cfg.tau)
                                if use_pcl
                                else logits.new_zeros((), dtype=torch.float32)
                            )
                            if use_self:  # T²·KL per row; gated rows count as zero, the mean stays over the batch
                                per_row = kl_per_sample(logits, self_logits[idx].to(device, non_blocking=True).float(), cfg.T)
                                if gate is not None:
                                    per_row = per_row * gate[idx]
                                anchor_kl = per_row.mean() * (cfg.T * cfg.T)
                            else:
                                anchor_kl = logits.new_zeros((), dtype=torch.float32)
                        prox = (
                            sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, anchor))
                            if anchor
                            else torch.zeros((), device=device)
                        )
                        loss = (
                            cfg.lambda_ce * ce
                            + cfg.lambda_kl * kl
                            + cfg.lambda_pcl * pcl
                            + cfg.lambda_prox * prox
                            + cfg.lambda_self * anchor_kl
                        )
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        if cfg.grad_clip > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(opt_params, cfg.grad_clip)
                        scaler.step(optimizer)
                        scaler.update()
                        terms = {"ce": ce, "kl": kl, "pcl": pcl, "prox": prox, "self": anchor_kl, "total": loss}
                        for key, value in terms.items():
                            sums[key] += float(value.detach())
                        steps += 1
                    if batches_per_pass == 0:
                        break
        finally:
            for m, flag in zip(model.modules(), modes):
                m.training = flag
            for p, flag in zip(model.parameters(), grad_flags):
                p.requires_grad_(flag)
            if head is not None:
                head.eval()
        stats = {k: v / max(steps, 1) for k, v in sums.items()}
        stats.update(steps=steps, samples=n, seconds=time.perf_counter() - start)
        if gate is not None:
            stats["self_gated"] = float(1.0 - gate.mean())  # share of rows left without the self-anchor
        logger.info(
            "distillation: %d steps on %d rows in %.1fs, loss %.3f (ce %.3f, kl %.3f, pcl %.3f, prox %.3g, self %.3f)",
            steps,
            n,
            stats["seconds"],
            stats["total"],
            stats["ce"],
            stats["kl"],
            stats["pcl"],
            stats["prox"],
            stats["self"],
        )
        return stats


def self_anchor_gate(self_logits: Tensor, labels: Tensor, teacher_logits: Tensor, how: str,
                     ratio: float = 2.0) -> Tensor | None:
    """Per-row 0/1 weights of the self-anchor (``DistillConfig.self_gate``); ``None`` for "all".

    ``label``: 1 where the anchor's top-1 is the row's intended label; ``teacher``: where it is the
    teacher's top-1; ``over``: 0 only where the anchor's top-1 differs from the label and is a class
    whose share of top-1 answers is at least ``ratio`` times its share of the labels.
    """
    if how == "all":
        return None
    if how not in SELF_GATES:
        raise DistillConfigError(f"distill.self-gate must be one of {SELF_GATES}, got {how!r}")
    own = self_logits.argmax(1).cpu()
    labels = labels.cpu().long()
    if how == "over":
        classes = self_logits.shape[1]
        answered = torch.bincount(own, minlength=classes).float()
        intended = torch.bincount(labels, minlength=classes).float()
        over = answered >= ratio * intended.clamp_min(1.0)
        return (~(over[own] & (own != labels))).float()
    reference = labels if how == "label" else teacher_logits.argmax(1).cpu()
    return (own == reference).float()


@torch.no_grad()
def own_logits(model: nn.Module, x: Tensor, source_index: Tensor, batch: int = 512) -> Tensor:
    """``model``'s logits (eval mode) on ``x[source_index]``, each distinct source evaluated once."""
    if source_index.ndim != 1 or (source_index.numel() and not 0 <= int(source_index.min()) <= int(source_index.max()) < len(x)):
        raise ValueError(f"source_index must be a 1-d index into the {len(x)} rows of x")
    device = next(model.parameters()).device
    uniq, inverse = torch.unique(source_index.long(), return_inverse=True)
    out = []
    with eval_mode(model):
        for b0 in range(0, len(uniq), batch):
            out.append(model(x[uniq[b0 : b0 + batch].to(x.device)].to(device).float()).float())
    return torch.cat(out)[inverse.to(device)]


def _feature_dim(extractor: PenultimateExtractor, x: Tensor, device: torch.device) -> int:
    try:
        return extractor.feature_dim
    except ValueError:  # a named feature module: its width is known after one forward pass
        with torch.no_grad(), eval_mode(extractor.model):
            return int(extractor(x[:1].to(device).float())[1].shape[1])


def _make_optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
