"""Teacher verification of generated images and class re-balancing (method.md section 4, step 3)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from clipfed_strategy.freq_augment import to_float_nchw

from .errors import SynthError

log = logging.getLogger(__name__)

BALANCE_MODES = ("min", "none")


@torch.no_grad()
def teacher_verdict(teacher, images: np.ndarray, labels: np.ndarray, device, batch_size: int = 512):
    """Teacher argmax and softmax probability of the intended class for uint8 NHWC ``images``.

    Returns
    -------
    pred : ndarray int64 [N]
    conf : ndarray float32 [N]
        ``softmax(zero_shot_logits)[i, labels[i]]``.
    """
    n = len(images)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    preds, confs = [], []
    lab = torch.as_tensor(np.asarray(labels, np.int64))
    for s in range(0, n, batch_size):
        x = to_float_nchw(images[s : s + batch_size]).to(device)
        probs = teacher.zero_shot_logits(x).float().softmax(dim=1).cpu()
        preds.append(probs.argmax(1))
        confs.append(probs.gather(1, lab[s : s + batch_size, None]).squeeze(1))
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(confs).numpy().astype(np.float32)


def keep_mask(pred: np.ndarray, conf: np.ndarray, labels: np.ndarray, min_conf: float) -> np.ndarray:
    """Keep ``x`` iff the teacher's argmax is its intended class and that class's prob >= ``min_conf``."""
    return (np.asarray(pred) == np.asarray(labels)) & (np.asarray(conf) >= min_conf)


def balanced_counts(kept: list[int], target: int, mode: str) -> list[int]:
    """Images per class in the final set: ``min`` = the same count for all classes
    (``min(target, min_c kept_c)``), ``none`` = ``min(target, kept_c)`` per class."""
    if mode not in BALANCE_MODES:
        raise SynthError(f"balance mode {mode!r} not allowed; choose from {list(BALANCE_MODES)}")
    if mode == "min":
        n = min([target, *kept])
        return [n] * len(kept)
    return [min(target, k) for k in kept]


def filter_report(class_names, generated, kept, top1) -> dict:
    """Per-class and overall generated / kept counts, kept share and teacher top-1 on generated images."""
    per_class = {}
    for c, name in enumerate(class_names):
        g = int(generated[c])
        per_class[name] = {
            "generated": g,
            "kept": int(kept[c]),
            "kept_share": float(kept[c] / g) if g else 0.0,
            "teacher_top1": float(top1[c] / g) if g else 0.0,
        }
    total_g = int(sum(generated))
    return {
        "per_class": per_class,
        "generated": total_g,
        "kept": int(sum(kept)),
        "kept_share": float(sum(kept) / total_g) if total_g else 0.0,
        "teacher_top1": float(sum(top1) / total_g) if total_g else 0.0,
    }
