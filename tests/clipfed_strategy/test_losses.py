"""The distillation losses against values computed with explicit numpy loops."""

import math

import numpy as np
import pytest
import torch

from clipfed_strategy.losses import kd_kl_loss, kl_per_sample, prototype_contrastive_loss


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kd_by_hand(student, teacher, T):
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p = _softmax([v / T for v in t_row])
        q = _softmax([v / T for v in s_row])
        total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
    return T * T * total / len(student)


def _pcl_by_hand(u, labels, protos, tau):
    total = 0.0
    for row, y in zip(u, labels):
        un = np.asarray(row) / np.linalg.norm(row)
        sims = []
        for p in protos:
            pn = np.asarray(p) / np.linalg.norm(p)
            sims.append(float(sum(a * b for a, b in zip(un, pn))) / tau)
        m = max(sims)
        log_z = m + math.log(sum(math.exp(s - m) for s in sims))
        total += -(sims[y] - log_z)
    return total / len(u)


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, 2.5]]


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_kl_loss_matches_hand_computation(T):
    got = kd_kl_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), T)
    assert float(got) == pytest.approx(_kd_by_hand(STUDENT, TEACHER, T), rel=1e-5)


def test_kd_kl_direction_is_teacher_first():
    # KL is asymmetric: swapping the arguments must change the value for these rows
    a = kd_kl_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), 1.0)
    b = kd_kl_loss(torch.tensor(TEACHER), torch.tensor(STUDENT), 1.0)
    assert float(a) != pytest.approx(float(b), rel=1e-3)
    assert float(a) == pytest.approx(_kd_by_hand(STUDENT, TEACHER, 1.0), rel=1e-5)


def test_kd_kl_is_zero_for_equal_logits_and_checks_shapes():
    x = torch.tensor(STUDENT)
    assert float(kd_kl_loss(x, x.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        kd_kl_loss(x, x[:, :2], 3.0)
    with pytest.raises(ValueError, match="T must be > 0"):
        kl_per_sample(x, x, 0.0)


def test_kl_per_sample_rows():
    got = kl_per_sample(torch.tensor(STUDENT), torch.tensor(TEACHER), 2.0)
    want = [_kd_by_hand([s], [t], 2.0) / 4.0 for s, t in zip(STUDENT, TEACHER)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_prototype_contrastive_loss_matches_hand_computation():
    u = [[1.0, 2.0, -1.0], [0.5, 0.0, 1.0], [-2.0, 1.0, 0.0]]
    labels = [0, 2, 1]
    protos = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
    for tau in (0.1, 0.5):
        got = prototype_contrastive_loss(
            torch.tensor(u), torch.tensor(labels), torch.tensor(protos), tau
        )
        assert float(got) == pytest.approx(_pcl_by_hand(u, labels, protos, tau), rel=1e-5)


def test_pcl_is_scale_invariant_and_low_when_aligned():
    protos = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    aligned = prototype_contrastive_loss(10 * torch.eye(3), labels, protos, 0.1)
    same = prototype_contrastive_loss(torch.eye(3), labels, protos, 0.1)
    wrong = prototype_contrastive_loss(torch.eye(3)[[1, 2, 0]], labels, protos, 0.1)
    assert float(aligned) == pytest.approx(float(same), rel=1e-6)
    assert float(aligned) < 1e-3 < 5.0 < float(wrong)
    with pytest.raises(ValueError, match="width"):
        prototype_contrastive_loss(torch.ones(3, 2), labels, protos, 0.1)
