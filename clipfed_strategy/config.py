"""CLIP-Fed's settings: typed, validated once, and mapped to flat run-config keys.

Every choice the paper does not confirm is a knob here with a clipfed default (see README,
"Configuration"). Run-config keys are kebab-case with a group prefix: ``clip-*`` (teacher),
``sds-*`` (server dataset), ``faug-*`` (frequency augmentation), ``screen-*`` (pre-aggregation),
``distill-*`` (post-aggregation), ``invert-*`` (trigger reconstruction from flagged models),
``validate-*`` (reply checks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from clipfed_strategy.distillation import DistillConfig
from clipfed_strategy.screening import COLLAPSE_REFERENCES, COMBINE_MODES, METRICS, MODES, RULES
from clipfed_strategy.trigger_inversion import InversionConfig
from clipfed_strategy.validation import ValidationConfig


class CLIPFedConfigError(ValueError):
    """A CLIP-Fed setting is outside its allowed values."""


@dataclass
class ScreeningConfig:
    """Pre-aggregation screening (README "Screening"; method.md §5).

    Parameters
    ----------
    enabled : bool, default True
    w_collapse, w_kl, w_agree, w_proto, w_bias : float, defaults 1.0, 0.0, 0.0, 0.0, 0.0
        Metric weights in the combined score (0 = off). ``collapse`` is the Non-IID-robust one;
        ``bias`` (:func:`clipfed_strategy.screening.class_bias_scores`) sees backdoors whose trigger the
        synthetic images already carry (Blend on noise-like images).
    combine : {"mean", "max"}, default "mean"
        Combined score: weighted mean of the metrics' robust z-scores, or their (weight-scaled) maximum.
    T : float, default 1.0
        Temperature of the client/teacher softmax in ``kl``.
    soft_collapse : bool, default False
        Mean probabilities instead of argmax counts in ``collapse``.
    soft_bias : bool, default False
        Mean probabilities (at ``T``) instead of argmax counts in ``bias``: a confident backdoor
        scores above an early, unsure benign model that also puts most rows in one class.
    collapse_ref : {"prediction", "label"}, default "prediction"
        ``collapse`` compares a perturbed row's prediction with the model's own prediction on the
        clean source (robust when client models misclassify synthetic server images) or with the
        intended label (see :func:`clipfed_strategy.screening.behaviour_scores`).
    rule : {"mad", "kmeans2", "threshold"}, default "mad"
    z_thr, gap, abs_thr : float, defaults 3.0, 1.0, 0.2
    warmup_rounds, warmup_z_thr : int, float, defaults 0, 1.0
        In rounds 1..``warmup_rounds`` decide with ``warmup_z_thr`` instead of ``z_thr``. In the
        first rounds every client model is close to random and a weak attacker scores like the
        benign clients (CIFAR-10 Blend: 2–9 accepted attacker-rounds at the start, whose backdoor
        the distillation then had to take out at a cost in accuracy); early rounds decide little
        of the final accuracy, so a stricter rule there trades a few benign updates for it.
    min_collapse : float, default 0.15
        A client is only flagged when its collapse also exceeds this absolute value.
    collapse_min_scale : float, default 0.0
        Lower bound on the spread (1.4826·MAD) that ``collapse`` z-scores divide by. A flip rate
        measured on a few hundred rows has a sampling error of ≈ 0.015, so in a round where the
        clients' rates happen to agree closely, differences of 0.03–0.05 would otherwise become
        z-scores of 3–6 (the CIFAR-10 config's benign rejections, benchmarks/README.md). 0 = plain MAD.
    max_reject_frac : float, default 0.5
    min_kept, min_clients : int, defaults 1, 3
    history : float, default 0.0
        β of a per-client moving average of the combined score over the rounds a client takes
        part in (clients are recognised by their Flower node id / client id): a client is judged
        on (1 − β)·S_round + β·S_past. 0 = every round alone. Meant for fixed client identities
        (cross-silo); a benign client that is an outlier round after round stays flagged longer.
    mode : {"drop", "soft"}, default "drop"
    soft_beta : float, default 1.0
    clip_norm : {"none", "median"}, default "none"
        Clip every kept update to the kept clients' median update norm.
    batched : bool, default True
        Evaluate the K client models together (``torch.func`` + ``vmap``) instead of in a loop.
    chunk_size : int, default 16
        Client models evaluated at once when batched.
    purify, purify_weight, purify_steps : bool, float, int, defaults False, 1.0, 0
        Instead of dropping a flagged client, distil its model on the server dataset towards the kept
        clients' mean answers (gated by ``distill-self-gate``) and the teacher, for ``purify_steps``
        optimiser steps (0 = the distillation's own ``distill-steps`` / ``distill-epochs``), then
        aggregate it with ``purify_weight`` × its example count
        (:meth:`clipfed_strategy.core.CLIPFedDefense.purify_flagged`). Needs ``mode="drop"``. Measured
        on CIFAR-10 (benchmarks/README.md, "Session 8"): it lets the backdoor back in (ASR 36–99 % with
        the distillation's budget, 9–17 % with 150 steps at weight 0.25, against 3.5–4.7 % dropping),
        for 0.3–1.0 points of MA; a research knob, not a safer default.
    """

    enabled: bool = True
    w_collapse: float = 1.0
    w_kl: float = 0.0
    w_agree: float = 0.0
    w_proto: float = 0.0
    w_bias: float = 0.0
    combine: str = "mean"
    T: float = 1.0
    soft_collapse: bool = False
    soft_bias: bool = False
    collapse_ref: str = "prediction"
    rule: str = "mad"
    z_thr: float = 3.0
    gap: float = 1.0
    abs_thr: float = 0.2
    warmup_rounds: int = 0
    warmup_z_thr: float = 1.0
    min_collapse: float = 0.15
    collapse_min_scale: float = 0.0
    max_reject_frac: float = 0.5
    min_kept: int = 1
    min_clients: int = 3
    history: float = 0.0
    mode: str = "drop"
    soft_beta: float = 1.0
    clip_norm: str = "none"
    batched: bool = True
    chunk_size: int = 16
    purify: bool = False
    purify_weight: float = 1.0
    purify_steps: int = 0

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise CLIPFedConfigError(f"screen-combine is {self.combine!r}; allowed values: {', '.join(COMBINE_MODES)}")
        if self.rule not in RULES:
            raise CLIPFedConfigError(f"screen-rule is {self.rule!r}; allowed values: {', '.join(RULES)}")
        if self.collapse_ref not in COLLAPSE_REFERENCES:
            raise CLIPFedConfigError(
                f"screen-collapse-ref is {self.collapse_ref!r}; allowed values: {', '.join(COLLAPSE_REFERENCES)}"
            )
        if self.mode not in MODES:
            raise CLIPFedConfigError(f"screen-mode is {self.mode!r}; allowed values: {', '.join(MODES)}")
        if self.clip_norm not in ("none", "median"):
            raise CLIPFedConfigError(f"screen-clip-norm is {self.clip_norm!r}; allowed values: none, median")
        if self.soft_beta <= 0:
            raise CLIPFedConfigError(f"screen-soft-beta must be > 0, got {self.soft_beta}")
        if self.warmup_rounds < 0:
            raise CLIPFedConfigError(f"screen-warmup-rounds must be >= 0, got {self.warmup_rounds}")
        if self.collapse_min_scale < 0:
            raise CLIPFedConfigError(f"screen-collapse-min-scale must be >= 0, got {self.collapse_min_scale}")
        if not 0 <= self.history < 1:
            raise CLIPFedConfigError(f"screen-history must lie in [0, 1), got {self.history}")
        if not 0 <= self.max_reject_frac <= 1:
            raise CLIPFedConfigError(f"screen-max-reject-frac must lie in [0, 1], got {self.max_reject_frac}")
        if self.chunk_size < 1:
            raise CLIPFedConfigError(f"screen-chunk-size must be >= 1, got {self.chunk_size}")
        if not 0 < self.purify_weight <= 1:
            raise CLIPFedConfigError(f"screen-purify-weight must lie in (0, 1], got {self.purify_weight}")
        if self.purify_steps < 0:
            raise CLIPFedConfigError(f"screen-purify-steps must be >= 0, got {self.purify_steps}")
        if self.purify and self.mode != "drop":
            raise CLIPFedConfigError("screen-purify applies to dropped clients: it needs screen-mode=\"drop\"")
        if all(w == 0 for w in self.weights.values()):
            raise CLIPFedConfigError(f"at least one of screen-w-{{{','.join(METRICS)}}} must be > 0")

    @property
    def weights(self) -> dict[str, float]:
        return {"collapse": self.w_collapse, "kl": self.w_kl, "agree": self.w_agree, "proto": self.w_proto,
                "bias": self.w_bias}


SELF_SOURCES = ("global", "ensemble")


@dataclass
class CLIPFedConfig:
    """All of CLIP-Fed's settings.

    Parameters
    ----------
    screen : ScreeningConfig
    distill : DistillConfig
        Post-aggregation distillation; plus ``distill_enabled``, ``distill_start_round``,
        ``distill_every``, ``distill_head`` ("linear"/"mlp"), ``distill_teacher_input``
        ("clean": the teacher sees each row's clean source, enforcing trigger invariance; "aug"),
        ``distill_data`` ("clean+aug", "clean", "aug"), ``distill_proto`` ("text", "image", "mix"),
        ``distill_self_source`` (whose predictions the self-anchor keeps: "global" = the aggregated
        model's own; "ensemble" = the mean logits of the round's kept client models, weighted by
        their screening weights (example counts; soft-mode weights) -- ensemble distillation in the
        manner of FedDF (Lin et al., NeurIPS 2020) over the clients that passed screening; the
        self-gate then judges the ensemble's answers).
    invert : InversionConfig
        Trigger reconstruction from flagged client models (:mod:`clipfed_strategy.trigger_inversion`).
    validation : ValidationConfig
    feature_module : str, default ""
        Dotted name of the module whose output is the penultimate feature; "" = input of the last
        ``nn.Linear`` (automatic).
    device : str, default "auto"
        "auto" = CUDA when present, else CPU.
    seed : int, default 0
    """

    screen: ScreeningConfig = field(default_factory=ScreeningConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    invert: InversionConfig = field(default_factory=InversionConfig)
    distill_enabled: bool = True
    distill_start_round: int = 1
    distill_every: int = 1
    distill_head: str = "linear"
    distill_teacher_input: str = "clean"
    distill_data: str = "clean+aug"
    distill_proto: str = "text"
    distill_self_source: str = "global"
    feature_module: str = ""
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("distill_head", ("linear", "mlp")),
            ("distill_teacher_input", ("clean", "aug")),
            ("distill_data", ("clean+aug", "clean", "aug")),
            ("distill_proto", ("text", "image", "mix")),
            ("distill_self_source", SELF_SOURCES),
        ):
            if getattr(self, name) not in allowed:
                raise CLIPFedConfigError(
                    f"{name.replace('_', '-')} is {getattr(self, name)!r}; allowed values: {', '.join(allowed)}"
                )
        if self.distill_every < 1 or self.distill_start_round < 0:
            raise CLIPFedConfigError("distill-every must be >= 1 and distill-start-round >= 0")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "CLIPFedConfig":
        """Read ``screen-*``, ``distill-*``, ``invert-*``, ``validate-*`` and the top-level keys from a flat dict."""
        def pick(prefix: str, dc: type) -> dict[str, Any]:
            out = {}
            for f in dataclasses.fields(dc):
                key = prefix + f.name.replace("_", "-")
                alias = {"batch-size": "batch", "weight-decay": "wd"}.get(f.name.replace("_", "-"))
                for k in (key, prefix + alias if alias else None):
                    if k and k in run_config:
                        out[f.name] = _cast(k, run_config[k], f.default)
            return out

        top = {}
        for f in dataclasses.fields(cls):
            if f.name in ("screen", "distill", "validation", "invert"):
                continue
            key = f.name.replace("_", "-")
            if key in run_config:
                top[f.name] = _cast(key, run_config[key], f.default)
        try:
            distill = DistillConfig(**pick("distill-", DistillConfig))
            invert = InversionConfig(**pick("invert-", InversionConfig))
        except ValueError as err:
            raise CLIPFedConfigError(str(err)) from err
        return cls(
            screen=ScreeningConfig(**pick("screen-", ScreeningConfig)),
            distill=distill,
            invert=invert,
            validation=ValidationConfig(**pick("validate-", ValidationConfig)),
            **top,
        )


def _cast(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            return bool(value)
        if isinstance(default, int):
            if float(value) != int(value):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise CLIPFedConfigError(f"run-config key '{key}' has value {value!r}, expected a {type(default).__name__}") from None
