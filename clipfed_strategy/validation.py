"""Validation of client replies before they touch anything on the server.

A reply is a mapping ``name -> ndarray`` (the client's full model state) plus its ``num-examples``.
It is checked against the current global model: same keys, shapes and dtypes, finite values, a
sane update norm and example count. Every rejection carries a reason a human can act on; the
adapters put it in the round's metrics. Pure numpy, no Flower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class ValidationConfig:
    """Limits a reply must respect.

    Parameters
    ----------
    max_update_norm_ratio : float, default 50.0
        Reject when ‖w_i − w_t‖ exceeds this multiple of the median update norm of the round's
        structurally valid replies (0 disables; needs 3 such replies; replies identical to the
        global model are left out of the median). Catches absurd boosts without a fixed scale.
    max_abs_value : float, default 1e6
        Reject any parameter whose absolute value exceeds this (0 disables).
    max_num_examples : int, default 10_000_000
        Reject ``num-examples`` above this; ``num-examples`` must always be a positive integer.
    """

    max_update_norm_ratio: float = 50.0
    max_abs_value: float = 1e6
    max_num_examples: int = 10_000_000


def check_structure(
    arrays: Mapping[str, Any], reference: Mapping[str, np.ndarray], num_examples: Any, cfg: ValidationConfig
) -> str | None:
    """Reason the reply is malformed, or ``None``. Checks keys, shapes, dtypes, finiteness, count,
    and that BatchNorm running variances (``*running_var``) are not negative."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer, float, np.floating)):
        return f"num-examples missing or not a number ({type(num_examples).__name__})"
    if not float(num_examples).is_integer() or num_examples <= 0:
        return f"num-examples must be a positive integer, got {num_examples}"
    if num_examples > cfg.max_num_examples:
        return f"num-examples {int(num_examples)} is absurd (> {cfg.max_num_examples})"
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing:
        return f"missing parameters {missing[:3]}{'…' if len(missing) > 3 else ''}"
    if extra:
        return f"unexpected parameters {extra[:3]}{'…' if len(extra) > 3 else ''}"
    for name, ref in reference.items():
        arr = arrays[name]
        if not isinstance(arr, np.ndarray):
            return f"parameter {name!r} is not an array ({type(arr).__name__})"
        if arr.shape != ref.shape:
            return f"parameter {name!r} has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"parameter {name!r} has dtype {arr.dtype}, expected {ref.dtype}"
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                return f"parameter {name!r} contains NaN or Inf"
            if cfg.max_abs_value > 0 and arr.size and float(np.max(np.abs(arr))) > cfg.max_abs_value:
                return f"parameter {name!r} has |value| > {cfg.max_abs_value:g}"
            if name.endswith("running_var") and np.any(arr < 0):
                # finite and excluded from the update norm, yet averaged in they make the global
                # model's BatchNorm divide by sqrt(negative): NaN outputs for everyone
                return f"parameter {name!r} has negative variances"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays − reference`` over floating-point entries (BatchNorm statistics excluded)."""
    total = 0.0
    for name, ref in reference.items():
        if ref.dtype.kind != "f" or "running_" in name:
            continue
        d = arrays[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(total))


def validate_replies(
    replies: list[tuple[Mapping[str, Any], Any]], reference: Mapping[str, np.ndarray], cfg: ValidationConfig | None = None
) -> list[str | None]:
    """One reason (or ``None`` = valid) per ``(arrays, num_examples)`` reply, norms judged round-wide."""
    cfg = cfg or ValidationConfig()
    reasons = [check_structure(a, reference, n, cfg) for a, n in replies]
    ok = [i for i, r in enumerate(reasons) if r is None]
    if cfg.max_update_norm_ratio > 0 and len(ok) >= 3:
        norms = {i: update_norm(replies[i][0], reference) for i in ok}
        # replies that return the global model untouched (norm 0) say nothing about the scale of a
        # real update; counted, a majority of them would make every trained model "absurd"
        moved = [nrm for nrm in norms.values() if nrm > 0]
        if not moved:
            return reasons
        med = float(np.median(moved))
        limit = cfg.max_update_norm_ratio * med
        for i, nrm in norms.items():
            if nrm > limit:
                reasons[i] = f"update norm {nrm:.3g} is absurd (> {cfg.max_update_norm_ratio:g} × median {med:.3g})"
    return reasons
