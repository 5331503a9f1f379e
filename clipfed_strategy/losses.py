"""The two alignment losses of CLIP-Fed's distillation (method.md §2, §6), as pure functions.

* :func:`kd_kl_loss`: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (CLIP2FL's
  knowledge-distillation term, teacher first).
* :func:`prototype_contrastive_loss`: cross-entropy of the cosine similarities between the
  student's projected feature and the class prototypes, at temperature τ.

Both compute in float32 whatever the input dtype, so they are safe under autocast.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) for every row (last dim = classes).

    Parameters
    ----------
    student_logits, teacher_logits : Tensor ``[..., C]``
        Broadcastable logits.
    T : float, default 1.0
        Temperature (> 0).

    Returns
    -------
    Tensor ``[...]`` (natural-log units, no T² factor).
    """
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 3.0) -> Tensor:
    """Distillation loss T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch.

    Parameters
    ----------
    student_logits : Tensor ``[N, C]``
    teacher_logits : Tensor ``[N, C]``
    T : float, default 3.0
        Temperature (> 0).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    return kl_per_sample(student_logits, teacher_logits, T).mean() * (T * T)


def prototype_contrastive_loss(
    u: Tensor, labels: Tensor, prototypes: Tensor, tau: float = 0.1
) -> Tensor:
    """Prototype contrastive loss −mean_i log softmax_c(⟨û_i, t̂_c⟩ / τ)[y_i].

    Parameters
    ----------
    u : Tensor ``[N, D]``
        Student embeddings (L2-normalised here).
    labels : Tensor ``[N]``, int64 in 0..C−1
    prototypes : Tensor ``[C, D]``
        Class prototypes, e.g. CLIP text embeddings (L2-normalised here).
    tau : float, default 0.1
        Temperature (> 0).
    """
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    if u.shape[-1] != prototypes.shape[-1]:
        raise ValueError(
            f"embedding width {u.shape[-1]} does not match prototype width {prototypes.shape[-1]}"
        )
    sims = F.normalize(u.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    return F.cross_entropy(sims / tau, labels)
