"""Behavioural screening: the maths on hand-built logits, then a small federated round on digits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfed_strategy.batched_eval import batched_logits_and_features, stack_states
from clipfed_strategy.screening import (
    ScreeningError,
    behaviour_scores,
    clip_update_norms,
    collapse_scores,
    combine,
    flip_collapse_scores,
    decide,
    robust_z,
    screen,
    two_means_upper,
)

C = 4


def _load_problem_module():
    from testkit import load_sibling

    return load_sibling(__file__, "_digits_fl.py", "clipfed_strategy_tests_digits_fl")


def _logits_from_preds(preds):
    """[K, N] predicted classes -> [K, N, C] logits whose argmax is that class."""
    return 5.0 * F.one_hot(torch.as_tensor(preds), C).float()


# --------------------------------------------------------------------------- collapse maths

LABELS = torch.tensor([0, 1, 2, 3] * 5)  # 20 rows, 5 per class


def test_collapse_cancels_static_label_skew_and_finds_trigger_target():
    n = len(LABELS)
    accurate = LABELS.clone()
    skewed = torch.where(LABELS < 2, LABELS, torch.zeros_like(LABELS))  # knows classes 0, 1 only
    backdoor_aug = torch.full((n,), 3)  # everything triggered -> class 3
    clean = _logits_from_preds(torch.stack([accurate, skewed, accurate]))
    aug = _logits_from_preds(torch.stack([accurate, skewed, backdoor_aug]))
    collapse, target, shift = collapse_scores(clean, LABELS, aug, LABELS, skew_discount=False)
    # the skewed client predicts 0 for classes 2 and 3 on both sets: no shift at all
    assert collapse.tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert int(target[2]) == 3
    # q^a(3) = 15/15 off-class rows, q^s(3) = 0
    assert float(shift[2, 3]) == pytest.approx(1.0)


def test_collapse_by_hand_with_skew_discount():
    # 2 clients, 8 rows with labels 0,0,1,1,2,2,3,3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    clean = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 0, 2, 3, 3]])
    aug = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0, 3, 3]])
    got, target, _ = collapse_scores(_logits_from_preds(clean), labels, _logits_from_preds(aug), labels)
    # client 1, class 0: 6 off-class rows; clean predicts 0 on 2 of them, aug on 4
    q_s, q_a = 2 / 6, 4 / 6
    assert float(got[1]) == pytest.approx((q_a - q_s) * (1 - q_s))
    assert int(target[1]) == 0 and float(got[0]) == pytest.approx(0.0)


def test_flip_collapse_by_hand():
    # 1 client, 8 rows; clean predictions are partly wrong (as on synthetic server images)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    clean = torch.tensor([[1, 0, 1, 3, 2, 0, 3, 2]])
    aug = torch.tensor([[0, 0, 0, 0, 2, 0, 0, 2]])
    got, target, flip = flip_collapse_scores(_logits_from_preds(clean), labels, _logits_from_preds(aug))
    # class 0: clean predicts non-0 on rows 0, 2, 3, 4, 6, 7; rows 0, 2, 3 and 6 go to 0 when perturbed
    moved = sum(1 for c, a in zip(clean[0].tolist(), aug[0].tolist()) if c != 0 and a == 0)
    assert moved == 4
    q_s = 1 / 6  # clean rows with label != 0 predicted 0: row 5 only, of 6
    assert float(flip[0, 0]) == pytest.approx(4 / 6 * (1 - q_s))
    assert int(target[0]) == 0 and float(got[0]) == pytest.approx(4 / 6 * (1 - q_s))
    raw, _, _ = flip_collapse_scores(_logits_from_preds(clean), labels, _logits_from_preds(aug), skew_discount=False)
    assert float(raw[0]) == pytest.approx(4 / 6)


def test_prediction_reference_survives_misclassified_server_images():
    """Client models that misclassify the (synthetic) server set: half of every class's clean rows
    already go to class 3. A trigger sends everything to class 3 for the backdoored client. The
    label-based shift sees little change (q^s(3) is already high); the flip rate sees every row
    that was not 3 move to 3."""
    n = len(LABELS)
    confused = torch.where(torch.arange(n) % 2 == 0, torch.full((n,), 3), LABELS)
    clean = _logits_from_preds(torch.stack([confused, confused]))
    aug = _logits_from_preds(torch.stack([confused, torch.full((n,), 3)]))
    source = torch.arange(n)
    by_label = behaviour_scores(clean, LABELS, aug, LABELS, aug_source=source, reference="label",
                                skew_discount=False)["collapse"]
    by_pred = behaviour_scores(clean, LABELS, aug, LABELS, aug_source=source, reference="prediction",
                               skew_discount=False)["collapse"]
    assert by_pred.tolist() == pytest.approx([0.0, 1.0])
    assert float(by_label[1]) < 0.6 < float(by_pred[1])
    with pytest.raises(ScreeningError, match="collapse-ref"):
        behaviour_scores(clean, LABELS, aug, LABELS, aug_source=source, reference="teacher")


def test_soft_collapse_uses_probabilities():
    labels = torch.tensor([0, 1])
    clean = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    aug = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    got, target, _ = collapse_scores(clean, labels, aug, labels, soft=True, T=1.0, skew_discount=False)
    p_clean = 1 / (1 + math.exp(2.0))  # P(class 0) for the label-1 row on clean
    assert float(got[0]) == pytest.approx(0.5 - p_clean, rel=1e-5)
    assert int(target[0]) == 0


def test_behaviour_scores_groups_pairs_and_teacher_metrics():
    n = len(LABELS)
    k_preds_clean = torch.stack([LABELS, LABELS])
    # group 0 (rows 0..19) is harmless; group 1 (rows 20..39) triggers client 1 onto class 2
    aug_preds = torch.stack([LABELS.repeat(2), torch.cat([LABELS, torch.full((n,), 2)])])
    source = torch.arange(n).repeat(2)
    groups = torch.arange(2).repeat_interleave(n)
    teacher = _logits_from_preds(LABELS)
    scores = behaviour_scores(
        _logits_from_preds(k_preds_clean), LABELS, _logits_from_preds(aug_preds), LABELS[source],
        teacher_logits_clean=teacher, aug_source=source, aug_groups=groups,
        client_feats_clean=torch.randn(2, n, 3),
    )
    assert scores["collapse"].tolist() == pytest.approx([0.0, 1.0])
    assert scores["collapse_target"].tolist()[1] == 2
    ungrouped = behaviour_scores(
        _logits_from_preds(k_preds_clean), LABELS, _logits_from_preds(aug_preds), LABELS[source],
        aug_source=source,
    )
    assert float(ungrouped["collapse"][1]) == pytest.approx(0.5)  # diluted by the harmless half
    # agree: client 1 disagrees with the teacher on 15 of the 60 rows (D_s ∪ D_a)
    assert scores["agree"].tolist() == pytest.approx([0.0, 15 / 60])
    assert float(scores["kl"][1]) > float(scores["kl"][0]) >= 0.0
    assert scores["proto"].shape == (2,)
    with pytest.raises(ScreeningError, match="teacher_logits_for_aug"):
        behaviour_scores(
            _logits_from_preds(k_preds_clean), LABELS, _logits_from_preds(aug_preds),
            LABELS[source], teacher_logits_clean=teacher,
        )


def test_prototype_deviation_spots_the_odd_client():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(10)
    centres = torch.randn(3, 8)
    feats = centres[labels][None].repeat(5, 1, 1) + 0.05 * torch.randn(5, 30, 8)
    feats[4, labels == 1] = -centres[1]  # client 4's class-1 features point elsewhere
    logits = torch.zeros(5, 30, 3)
    proto = behaviour_scores(logits, labels, logits, labels, client_feats_clean=feats)["proto"]
    assert int(proto.argmax()) == 4 and float(proto[4]) > 1.5 > 0.1 > float(proto[:4].max())


# --------------------------------------------------------------------------- combination

def test_robust_z_matches_numpy():
    s = torch.tensor([0.1, 0.2, 0.15, 0.9, 0.12, 0.11])
    arr = s.numpy().astype(np.float64)
    med = np.median(arr)
    mad = np.median(np.abs(arr - med))
    want = (arr - med) / (1.4826 * mad + 1e-6)
    assert robust_z(s).tolist() == pytest.approx(want.tolist(), rel=1e-4)


def test_min_scale_stops_tiny_spreads_becoming_large_z():
    # eight benign flip rates that agree to within ±0.005 this round, one at 0.10: MAD z ≈ 6
    s = torch.tensor([0.060, 0.062, 0.058, 0.061, 0.059, 0.060, 0.063, 0.100])
    plain = screen({"collapse": s}, {"collapse": 1.0}, z_thr=2.0, min_collapse=0.0)
    assert plain.flagged.tolist() == [False] * 7 + [True]
    med = float(s.quantile(0.5))
    z = robust_z(s, min_scale=0.03)
    assert z.tolist() == pytest.approx(((s - med) / (0.03 + 1e-6)).tolist(), rel=1e-5)  # floor used: 1.4826·MAD < 0.03
    floored = screen({"collapse": s}, {"collapse": 1.0}, z_thr=2.0, min_collapse=0.0, min_scale={"collapse": 0.03})
    assert not bool(floored.flagged.any())  # (0.100 − 0.0605) / 0.03 = 1.3 < 2
    # a clear outlier is still flagged, and a spread above the floor leaves the z-scores unchanged
    s2 = s.clone(); s2[7] = 0.25
    assert screen({"collapse": s2}, {"collapse": 1.0}, z_thr=2.0, min_collapse=0.0,
                  min_scale={"collapse": 0.03}).flagged.tolist() == [False] * 7 + [True]
    wide = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9])
    assert robust_z(wide, min_scale=0.03).tolist() == pytest.approx(robust_z(wide).tolist())
    with pytest.raises(ScreeningError, match="minimum metric scales"):
        screen({"collapse": s}, {"collapse": 1.0}, min_scale={"collapse": -1.0})


def test_combine_weighted_mean_and_errors():
    z = {"collapse": torch.tensor([1.0, 3.0]), "kl": torch.tensor([4.0, 0.0])}
    assert combine(z, {"collapse": 1.0, "kl": 0.5, "agree": 0.0}).tolist() == pytest.approx([2.0, 2.0])
    with pytest.raises(ScreeningError, match="not computed"):
        combine(z, {"collapse": 1.0, "proto": 1.0})
    with pytest.raises(ScreeningError, match="> 0"):
        combine(z, {"collapse": 0.0})
    with pytest.raises(ScreeningError, match=">= 0"):
        combine(z, {"collapse": -1.0})
    # max: each metric scaled by w / max w, then the largest (kl's 4.0 counts half)
    assert combine(z, {"collapse": 1.0, "kl": 0.5}, how="max").tolist() == pytest.approx([2.0, 3.0])
    with pytest.raises(ScreeningError, match="screen.combine must be one of"):
        combine(z, {"collapse": 1.0}, how="median")


def test_decide_rules_and_fail_safes():
    s = torch.tensor([0.0, 0.2, -0.3, 5.0, 3.5, 0.1])
    strong = torch.full((6,), 0.9)
    d = decide(s, collapse=strong)
    assert d.flagged.tolist() == [False, False, False, True, True, False]
    assert d.weights.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0] and d.enforced
    # absolute floor: client 4 has too little collapse to be flagged
    weak = strong.clone()
    weak[4] = 0.1
    d = decide(s, collapse=weak, num_examples=[10, 20, 30, 40, 50, 60])
    assert d.flagged_indices() == [3] and "min-collapse" in d.reasons[4]
    assert d.weights.tolist() == [10, 20, 30, 0, 50, 60]
    # cap: at most floor(0.2*6) = 1 flagged, the highest score
    d = decide(s, collapse=strong, max_reject_frac=0.2)
    assert d.flagged_indices() == [3] and "cap" in d.reasons[4]
    # min-kept: with 2 clients and max_reject_frac 1, one is always kept
    d = decide(torch.tensor([9.0, 8.0]), max_reject_frac=1.0, min_kept=1, min_clients=2, z_thr=1.0)
    assert d.flagged_indices() == [0]
    # too few clients: flags reported, not enforced
    d = decide(torch.tensor([0.0, 9.0]), num_examples=[3, 4], min_clients=3)
    assert d.flagged.tolist() == [False, True] and not d.enforced
    assert d.weights.tolist() == [3, 4] and "not enforced" in d.reasons[1]


def test_decide_soft_weights_formula():
    s = torch.tensor([-1.0, 0.5, 4.0, 3.0])
    collapse = torch.tensor([0.5, 0.5, 0.9, 0.05])
    d = decide(s, mode="soft", soft_beta=0.5, num_examples=[10, 10, 10, 10], collapse=collapse, z_thr=2.5)
    # rule "mad": the penalty starts at the threshold; client 3 is above it but below the collapse floor
    want = [10.0, 10.0, 10 * math.exp(-0.5 * (4.0 - 2.5)), 10.0]
    assert d.weights.tolist() == pytest.approx(want, rel=1e-6)
    other = decide(s, mode="soft", soft_beta=0.5, num_examples=[10] * 4, collapse=collapse, rule="threshold",
                   abs_thr=3.5)
    assert other.weights.tolist() == pytest.approx([10.0, 10 * math.exp(-0.25), 10 * math.exp(-2.0), 10.0], rel=1e-6)
    assert d.flagged.tolist() == [False, False, True, False]
    with pytest.raises(ScreeningError, match="soft-beta"):
        decide(s, mode="soft", soft_beta=0.0)
    with pytest.raises(ScreeningError, match="screen.mode"):
        decide(s, mode="ban")
    with pytest.raises(ScreeningError, match="screen.decision"):
        decide(s, rule="dbscan")


def test_kmeans2_and_threshold_rules():
    s = torch.tensor([0.1, 0.0, 0.2, 0.15, 3.0, 3.2])
    upper, gap = two_means_upper(s)
    assert upper.tolist() == [False, False, False, False, True, True]
    assert gap == pytest.approx(3.1 - 0.1125, rel=1e-5)
    assert decide(s, rule="kmeans2", min_collapse=0).flagged_indices() == [4, 5]
    assert decide(s, rule="kmeans2", gap=5.0, min_collapse=0).flagged_indices() == []
    # upper cluster must hold fewer than K/2 clients
    assert decide(torch.tensor([0.0, 3.0, 3.0, 3.1]), rule="kmeans2", min_collapse=0).flagged_indices() == []
    scores = {"collapse": torch.tensor([0.05, 0.5, 0.1]), "collapse_target": torch.tensor([1, 2, 1])}
    d = screen(scores, {"collapse": 1.0}, rule="threshold", reference={"collapse": 0.04})
    assert d.flagged_indices() == [1] and "onto class 2" in d.reasons[1]
    with pytest.raises(ScreeningError, match="reference"):
        screen(scores, {"collapse": 1.0}, rule="threshold")


def test_clip_update_norms():
    g = torch.zeros(2)
    clients = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [30.0, 40.0]])
    kept = torch.tensor([True, True, True, False])
    clipped, med = clip_update_norms(g, clients, kept)
    assert med == pytest.approx(2.0)
    assert torch.allclose(clipped, torch.tensor([[1.2, 1.6], [0.0, 1.0], [0.0, 2.0], [1.2, 1.6]]))
    clipped, _ = clip_update_norms(torch.ones(2), clients + 1, kept)
    assert clipped[3].tolist() == pytest.approx([2.2, 2.6])


# --------------------------------------------------------------------------- a round on digits

ROLES = ("iid", "iid", "iid", "skewed", "skewed", "backdoor", "iid")
ATTACKED = [0, 1, 2, 3, 4, 5]
ATTACK_FREE = [0, 1, 2, 3, 4, 6]


@pytest.fixture(scope="module")
def round_scores():
    """Screening scores of 7 client models; index 5 is the backdoored one."""
    P = _load_problem_module()
    pb = P.build_problem(roles=ROLES, seed=3)
    st = stack_states([m.state_dict() for m in pb.clients])
    template = P.make_cnn()
    logits_clean, feats = batched_logits_and_features(template, st, pb.x_server)
    logits_aug, _ = batched_logits_and_features(template, st, pb.x_aug, return_features=False)
    teacher = 5.0 * F.one_hot(pb.y_server, 10).float()  # a knowledgeable stand-in teacher

    def scores(idx):
        return behaviour_scores(
            logits_clean[idx], pb.y_server, logits_aug[idx], pb.y_server[pb.aug_source],
            teacher_logits_clean=teacher, client_feats_clean=feats[idx],
            aug_source=pb.aug_source, aug_groups=pb.aug_variant,
        )

    return pb, scores


def test_screening_flags_exactly_the_backdoor(round_scores):
    pb, scores = round_scores
    roles = [pb.roles[i] for i in ATTACKED]
    assert roles.count("skewed") == 2 and roles.index("backdoor") == 5
    s = scores(ATTACKED)
    d = screen(s, num_examples=[100] * 6)
    assert d.flagged_indices() == [5]
    assert int(s["collapse_target"][5]) == 0 and "onto class 0" in d.reasons[5]
    assert d.weights.tolist() == [100, 100, 100, 100, 100, 0]
    # skewed clients really are different: the teacher-agreement metrics single them out
    assert float(s["kl"][3:5].min()) > float(s["kl"][[0, 1, 2, 5]].max())


def test_no_attacker_nobody_flagged(round_scores):
    _, scores = round_scores
    for rule in ("mad", "kmeans2"):
        d = screen(scores(ATTACK_FREE), rule=rule)
        assert d.flagged_indices() == [], (rule, d.reasons)


def test_soft_mode_downweights_the_backdoor(round_scores):
    _, scores = round_scores
    d = screen(scores(ATTACKED), mode="soft", num_examples=[100] * 6)
    assert float(d.weights[5]) < 0.05 * float(d.weights[:5].min())
    assert d.weights[:5].tolist() == pytest.approx([100.0] * 5)  # benign: no collapse, full weight


def test_collapse_reference_is_a_run_config_key():
    from clipfed_strategy.config import CLIPFedConfig, CLIPFedConfigError

    assert CLIPFedConfig.from_run_config({}).screen.collapse_ref == "prediction"
    assert CLIPFedConfig.from_run_config({"screen-collapse-ref": "label"}).screen.collapse_ref == "label"
    with pytest.raises(CLIPFedConfigError, match="screen-collapse-ref.*allowed values: prediction, label"):
        CLIPFedConfig.from_run_config({"screen-collapse-ref": "teacher"})


def test_history_averages_each_clients_score_over_rounds():
    # client 3 was suspicious in earlier rounds; this round it scores just under the threshold
    scores = {"collapse": torch.tensor([0.10, 0.11, 0.09, 0.14, 0.10, 0.12, 0.08, 0.11])}
    alone = screen(scores, {"collapse": 1.0}, z_thr=3.0, min_collapse=0.0)
    s3 = float(alone.combined[3])
    assert not bool(alone.flagged.any()) and 1.5 < s3 < 3.0
    prior = [None, 0.1, None, 6.0, -0.5, None, None, None]
    dec = screen(scores, {"collapse": 1.0}, z_thr=3.0, min_collapse=0.0, prior=prior, history=0.5)
    assert dec.flagged.tolist() == [i == 3 for i in range(8)]
    expected = alone.combined.clone()
    for i, p in enumerate(prior):
        if p is not None:
            expected[i] = 0.5 * alone.combined[i] + 0.5 * p
    torch.testing.assert_close(dec.combined, expected)  # new clients (no prior) are judged on this round alone
    torch.testing.assert_close(dec.round_combined, alone.combined)
    rec = dec.records()[3]
    assert rec["score"] == pytest.approx(0.5 * s3 + 3.0) and rec["round_score"] == pytest.approx(s3)
    assert "round_score" not in alone.records()[3]
    with pytest.raises(ScreeningError, match="history must be in"):
        screen(scores, {"collapse": 1.0}, prior=prior, history=1.0)
    with pytest.raises(ScreeningError, match="prior has 2 entries for 8 clients"):
        screen(scores, {"collapse": 1.0}, prior=[None, 1.0], history=0.5)


def test_class_bias_by_hand_and_as_a_weighted_metric():
    from clipfed_strategy.screening import class_bias_scores

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    preds = torch.tensor([
        [0, 0, 1, 1, 2, 2, 3, 3],  # perfect: bias 0
        [0, 0, 0, 1, 2, 2, 3, 0],  # 2 of the 6 non-class-0 rows sent to 0: 1/3
        [0, 0, 0, 0, 0, 0, 3, 3],  # a backdoor the clean rows already trigger: 4/6 onto 0
    ])
    bias, target = class_bias_scores(_logits_from_preds(preds), labels)
    torch.testing.assert_close(bias, torch.tensor([0.0, 1 / 3, 2 / 3]))
    assert target[1:].tolist() == [0, 0]
    # behaviour_scores reports it; a weight makes it count in the decision
    k = 8
    preds = torch.stack([LABELS] * (k - 1) + [torch.where(LABELS == 3, 3, 0)])
    for i in range(k - 1):  # mild, different per-client skews
        preds[i, i] = (int(LABELS[i]) + 1) % C
    clean = _logits_from_preds(preds)
    scores = behaviour_scores(clean, LABELS, clean, LABELS, aug_source=torch.arange(len(LABELS)))
    assert float(scores["collapse"][-1]) == 0.0 and float(scores["bias"][-1]) == pytest.approx(2 / 3)  # 10 of 15
    assert not screen(scores, {"collapse": 1.0}, min_collapse=0.0).flagged.any()
    flagged = screen(scores, {"collapse": 1.0, "bias": 1.0}, min_collapse=0.0).flagged
    assert flagged.tolist() == [False] * (k - 1) + [True]
    assert "bias" in screen(scores, {"collapse": 1.0}).records()[0] and "bias_target" not in screen(scores, {"collapse": 1.0}).records()[0]


def test_soft_bias_separates_a_confident_backdoor_from_an_unsure_collapse():
    from clipfed_strategy.screening import class_bias_scores

    labels = torch.tensor([0, 1, 1, 2, 2, 3, 3])  # 6 rows whose label is not 0
    unsure = torch.zeros(7, 4)
    unsure[:, 0] = 0.5  # an early benign model: every row top-1 class 0, but p(0) = e^.5 / (e^.5 + 3) ≈ 0.35
    confident = torch.zeros(7, 4)
    confident[:, 0] = 8.0  # a backdoored model that fires on the clean rows: p(0) ≈ 0.999
    logits = torch.stack([unsure, confident])
    hard, _ = class_bias_scores(logits, labels)
    torch.testing.assert_close(hard, torch.tensor([1.0, 1.0]))  # top-1 shares cannot tell them apart
    soft, target = class_bias_scores(logits, labels, soft=True)
    p = lambda a: math.exp(a) / (math.exp(a) + 3)
    assert soft.tolist() == pytest.approx([p(0.5), p(8.0)], rel=1e-5) and target.tolist() == [0, 0]
    # behaviour_scores passes the switch through
    scores = behaviour_scores(logits, labels, logits, labels, aug_source=torch.arange(7), soft_bias=True)
    torch.testing.assert_close(scores["bias"], soft)
