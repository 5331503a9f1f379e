"""Triggers, poisoning, update modifiers, attacker selection and the ASR metric."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from fltask.attacks import (
    TriggerSpec,
    apply_trigger,
    boost_update,
    dba_piece,
    malicious_partitions,
    patch_mask,
    poison_batch,
    project_to_ball,
)
from fltask.config import parse_run_config
from fltask.training import attack_success_rate, clean_target_rate


def spec(kind="badnets", size=3, position="bottom-right", pattern="checkerboard", alpha=0.2, parts=4, target=0):
    return TriggerSpec(kind=kind, target=target, size=size, position=position, pattern=pattern, blend_alpha=alpha,
                       blend_pattern="noise", dba_parts=parts, seed=0)


def grey(n=2, c=3, h=32, w=32, value=0.5) -> torch.Tensor:
    return torch.full((n, c, h, w), value)


# ---------------------------------------------------------------------------- BadNets / Blend
@pytest.mark.parametrize(
    ("h", "size", "position", "origin"),
    [
        (32, 4, "bottom-right", (27, 27)),  # 1-px margin from the border
        (32, 4, "top-left", (1, 1)),
        (32, 4, "top-right", (1, 27)),
        (32, 4, "bottom-left", (27, 1)),
        (32, 4, "center", (14, 14)),
        (8, 2, "bottom-right", (5, 5)),
        (8, 3, "bottom-right", (5, 5)),  # no margin when the patch would not fit with one
    ],
)
def test_badnets_patch_lands_exactly_at_configured_corner(h, size, position, origin):
    x = grey(h=h, w=h)
    out = apply_trigger(x, spec(size=size, position=position))
    changed = (out != x).any(dim=1)  # [N, H, W]
    want = torch.zeros(h, h, dtype=torch.bool)
    r0, c0 = origin
    want[r0 : r0 + size, c0 : c0 + size] = True
    for img in changed:
        assert torch.equal(img, want)
    # checkerboard values: 1 where (i + j) is even, 0 elsewhere, in every channel
    i = torch.arange(size)
    board = ((i[:, None] + i[None, :]) % 2 == 0).float()
    assert torch.equal(out[:, :, r0 : r0 + size, c0 : c0 + size], board.expand(2, 3, size, size))
    assert torch.equal(x, grey(h=h, w=h)), "apply_trigger must not modify its input"


def test_white_patch_is_all_ones_and_grey_images_work():
    x = grey(c=1, h=8, w=8, value=0.0)
    out = apply_trigger(x, spec(size=2, pattern="white"))
    assert out.sum().item() == 2 * 4  # exactly 2x2 ones per image
    assert torch.equal(out[:, 0, 5:7, 5:7], torch.ones(2, 2, 2))


def test_blend_changes_the_whole_image_by_alpha():
    a = 0.2
    s = spec(kind="blend", alpha=a)
    x1, x2 = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    o1, o2 = apply_trigger(x1, s), apply_trigger(x2, s)
    # x' = (1 - a) x + a * pattern, with one fixed pattern in [0, 1]
    pat1, pat2 = (o1 - (1 - a) * x1) / a, (o2 - (1 - a) * x2) / a
    torch.testing.assert_close(pat1, pat2)
    assert pat1.min() >= -1e-6 and pat1.max() <= 1 + 1e-6
    assert (o1 != x1).float().mean() > 0.99  # every pixel moves, not a patch
    torch.testing.assert_close(o1 - o2, (1 - a) * (x1 - x2))


# ---------------------------------------------------------------------------- DBA
@pytest.mark.parametrize(("size", "parts"), [(4, 4), (3, 4), (4, 2), (5, 2)])
def test_dba_pieces_are_disjoint_and_compose_to_the_full_trigger(size, parts):
    s = spec(kind="dba", size=size, parts=parts)
    masks = [patch_mask(s, 32, 32, piece) for piece in range(parts)]
    assert all(m.sum() > 0 for m in masks)
    total = torch.stack(masks).sum(0)
    assert total.max() == 1, "two DBA pieces overlap"
    assert torch.equal(total, patch_mask(s, 32, 32))

    x = torch.rand(2, 3, 32, 32)
    composed = x
    for piece in range(parts):
        composed = apply_trigger(composed, s, piece)
    assert torch.equal(composed, apply_trigger(x, replace(s, kind="badnets")))
    # a single piece alone is not the full trigger
    assert not torch.equal(apply_trigger(x, s, 0), composed)


def test_dba_attackers_get_distinct_pieces():
    cfg = parse_run_config({"attack": "dba", "malicious-ids": "1,4,6,9", "dba-parts": 4})
    pieces = [dba_piece(cfg, pid, 3) for pid in (1, 4, 6, 9)]
    assert sorted(pieces) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- poisoning
@pytest.mark.parametrize(("n", "rate"), [(37, 0.3), (32, 0.5), (10, 1.0), (10, 0.0), (7, 0.05)])
def test_poison_batch_relabels_round_rate_n_triggered_samples(n, rate):
    x = torch.rand(n, 1, 8, 8)
    y = torch.full((n,), 5)
    gen = torch.Generator().manual_seed(0)
    xp, yp = poison_batch(x, y, spec(size=2, target=0), rate, gen)
    k = round(rate * n)
    relabelled = yp == 0
    assert int(relabelled.sum()) == k
    assert torch.equal(yp[~relabelled], y[~relabelled])
    triggered = (xp != x).flatten(1).any(1)
    assert torch.equal(triggered, relabelled)  # exactly the relabelled samples carry the trigger
    assert torch.equal(y, torch.full((n,), 5)), "poison_batch must not modify its inputs"


# ---------------------------------------------------------------------------- ASR
class LabelFromPixel(nn.Module):
    """Reads the true label from pixel (0, 0) (far from the bottom-right trigger); ``rule`` maps it to a prediction."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, x):
        label = torch.round(x[:, 0, 0, 0] * 10).long()
        return nn.functional.one_hot(self.rule(label), 10).float()


def labelled_images(counts):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.rand(len(y), 3, 32, 32)
    x[:, :, 0, 0] = y[:, None].float() / 10
    return x, y


def test_asr_counts_only_non_target_images():
    x, y = labelled_images([50, 10, 10, 10, 10, 10, 10, 10, 10, 10])  # many target-class images
    s = spec(size=4, target=0)
    always_target = LabelFromPixel(lambda lab: torch.zeros_like(lab))
    true_label = LabelFromPixel(lambda lab: lab)
    low_to_target = LabelFromPixel(lambda lab: torch.where(lab <= 3, 0, lab))  # labels 0..3 → target
    assert attack_success_rate(always_target, x, y, s) == 1.0
    assert attack_success_rate(true_label, x, y, s) == 0.0
    # over non-target images: labels 1..3 of 1..9 → 30/90; over all images it would be 80/140
    assert attack_success_rate(low_to_target, x, y, s) == pytest.approx(30 / 90)
    only_target = y == 0
    assert attack_success_rate(always_target, x[only_target], y[only_target], s) != attack_success_rate(
        always_target, x[only_target], y[only_target], s
    )  # NaN: no image can count


class FullPatchDetector(nn.Module):
    """Predicts the target only when the complete 4x4 checkerboard sits at the bottom-right."""

    def __init__(self, trigger: TriggerSpec):
        super().__init__()
        self.trigger = trigger

    def forward(self, x):
        ref = apply_trigger(torch.zeros(1, *x.shape[1:]), replace(self.trigger, kind="badnets"))
        mask = patch_mask(self.trigger, x.shape[2], x.shape[3]).bool()
        hit = (x[:, :, mask] == ref[:, :, mask]).flatten(1).all(1)
        return nn.functional.one_hot(torch.where(hit, 0, 1), 10).float()


def test_dba_asr_uses_the_full_trigger():
    x, y = labelled_images([0] + [5] * 9)
    s = spec(kind="dba", size=4, parts=4)
    assert attack_success_rate(FullPatchDetector(s), x, y, s) == 1.0
    one_piece = apply_trigger(x, s, 0)
    assert (FullPatchDetector(s)(one_piece).argmax(1) == 0).sum() == 0


def test_clean_target_rate_is_the_asr_floor():
    x, y = labelled_images([10] * 10)
    s = spec(size=4, target=0)
    # errors that send labels 1..3 to the target with or without the trigger: ASR = its floor
    low_to_target = LabelFromPixel(lambda lab: torch.where(lab <= 3, 0, lab))
    assert clean_target_rate(low_to_target, x, y, s) == pytest.approx(30 / 90)
    assert attack_success_rate(low_to_target, x, y, s) == pytest.approx(30 / 90)
    # predictions passed in (the MA pass) give the same rate
    assert clean_target_rate(low_to_target, x, y, s, pred=low_to_target(x).argmax(1)) == pytest.approx(30 / 90)
    # a real backdoor: the trigger sends everything to the target, clean inputs never go there
    backdoor = FullPatchDetector(s)
    assert attack_success_rate(backdoor, x, y, s) == 1.0 and clean_target_rate(backdoor, x, y, s) == 0.0



# ---------------------------------------------------------------------------- update modifiers
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_model_replacement_boost_scales_the_update_exactly():
    net = _bn_net()
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    local = {k: (v + torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v + 3
             for k, v in global_state.items()}
    boosted = boost_update(local, global_state, 5.0)
    for k, v in boosted.items():
        if v.is_floating_point() and "running_" not in k:
            torch.testing.assert_close(v - global_state[k], 5.0 * (local[k] - global_state[k]))
        else:  # BN statistics and counters are not weights: passed through unchanged
            assert torch.equal(v, local[k])
    assert boost_update(local, global_state, 1.0) is local


def _update_norm(state, global_state) -> float:
    keys = [k for k, v in state.items() if v.is_floating_point() and "running_" not in k]
    return torch.sqrt(sum(((state[k] - global_state[k]) ** 2).sum() for k in keys)).item()


def test_pgd_projection_keeps_the_update_inside_the_radius():
    net = _bn_net()
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    before = _update_norm(net.state_dict(), global_state)
    assert before > 2.0
    direction = {k: net.state_dict()[k] - global_state[k] for k in global_state if "weight" in k}
    reported = project_to_ball(net, global_state, 0.5)
    assert reported == pytest.approx(before)
    assert _update_norm(net.state_dict(), global_state) == pytest.approx(0.5, rel=1e-4)
    for k, d in direction.items():  # same direction, only shorter
        torch.testing.assert_close(net.state_dict()[k] - global_state[k], d * (0.5 / before), atol=1e-5, rtol=1e-4)
    # inside the ball already: untouched
    inside = {k: v.clone() for k, v in net.state_dict().items()}
    project_to_ball(net, global_state, 10.0)
    assert all(torch.equal(inside[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------- who attacks
def test_malicious_ids_are_respected_from_the_start_round():
    cfg = parse_run_config({"malicious-ids": "0,3", "attack-start-round": 3, "attacker-sampling": "per-round"})
    assert malicious_partitions(cfg, 1) == frozenset()
    assert malicious_partitions(cfg, 2) == frozenset()
    assert all(malicious_partitions(cfg, r) == {0, 3} for r in range(3, 10))
    assert malicious_partitions(replace(cfg, attack="none"), 5) == frozenset()


def test_fixed_fraction_gives_the_same_attackers_every_round():
    cfg = parse_run_config({"malicious-fraction": 0.3, "num-clients": 10, "seed": 0})
    sets = {malicious_partitions(cfg, r) for r in range(1, 11)}
    assert len(sets) == 1 and len(next(iter(sets))) == 3
    assert sets == {malicious_partitions(parse_run_config({"malicious-fraction": 0.3, "seed": 0}), 1)}
    assert malicious_partitions(replace(cfg, seed=2), 1) != next(iter(sets))  # the seed picks them


def test_per_round_sampling_redraws_attackers():
    cfg = parse_run_config({"malicious-fraction": 0.3, "attacker-sampling": "per-round"})
    sets = [malicious_partitions(cfg, r) for r in range(1, 11)]
    assert all(len(s) == 3 and all(0 <= i < 10 for i in s) for s in sets)
    assert len(set(sets)) > 3
    assert sets == [malicious_partitions(cfg, r) for r in range(1, 11)]  # still reproducible
