"""Server-side distillation: it removes a BadNets backdoor on digits and honours its settings."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfed_strategy.distillation import DistillConfig, DistillConfigError, Distiller
from clipfed_strategy.losses import prototype_contrastive_loss


def _load_problem_module():
    from testkit import load_sibling

    return load_sibling(__file__, "_digits_fl.py", "clipfed_strategy_tests_digits_fl")


P = _load_problem_module()
PROTOS = F.normalize(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)), dim=1)


@pytest.fixture(scope="module")
def backdoored():
    """A model fine-tuned with BadNets (2×2 corner → 0) plus the server's distillation set: clean
    images and random-patch copies (anywhere / any corner, not the trigger) with clean labels."""
    pb = P.build_problem(roles=("backdoor",), seed=0)
    rows = pb.aug_variant == 1
    x = torch.cat([pb.x_server, pb.x_aug[rows]])
    source = torch.cat([torch.arange(len(pb.x_server)), pb.aug_source[rows]])
    y = pb.y_server[source]
    teacher = 5.0 * F.one_hot(y, 10).float()  # knowledgeable teacher, fed the clean source
    return pb, x, y, teacher


def _small_data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, 3.0 * F.one_hot(y, 10).float()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_distillation_removes_backdoor_keeps_accuracy(backdoored):
    """The reconstruction's teacher-only losses (CE + KL + PCL) with a knowledgeable teacher."""
    pb, x, y, teacher = backdoored
    model = copy.deepcopy(pb.clients[0])
    acc0 = P.accuracy(model, pb.x_test, pb.y_test)
    asr0 = P.attack_success(model, pb.x_test, pb.y_test)
    stats = Distiller(16).distill(model, x, y, teacher, PROTOS, DistillConfig(epochs=6, lambda_ce=1.0, lambda_kl=2.0,
                                                                             lambda_self=0.0))
    acc1 = P.accuracy(model, pb.x_test, pb.y_test)
    asr1 = P.attack_success(model, pb.x_test, pb.y_test)
    assert asr0 >= 0.5
    assert asr1 <= asr0 / 2, (asr0, asr1)
    assert acc1 >= acc0 - 0.04, (acc0, acc1)
    assert stats["steps"] == 6 * 5 and stats["samples"] == 600
    assert set(stats) >= {"ce", "kl", "pcl", "prox", "total", "steps", "seconds"}
    assert stats["pcl"] > 0 and stats["kl"] > 0
    assert not model.training  # eval flag restored


def test_deterministic_given_seed():
    x, y, t = _small_data()
    base = P.make_cnn()
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(base)
        Distiller(16, seed=5).distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=4, batch_size=16, seed=seed))
        runs.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_bn_frozen_keeps_running_stats_and_train_updates_them():
    x, y, t = _small_data()
    model = P.make_cnn()
    mean0 = model[1].running_mean.clone()
    Distiller(16).distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=3, batch_size=16))
    assert torch.equal(model[1].running_mean, mean0)
    assert not torch.equal(model[0].weight, P.make_cnn()[0].weight)  # it did train
    Distiller(16).distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=3, batch_size=16, bn="train"))
    assert not torch.equal(model[1].running_mean, mean0)


def test_trainable_head_and_last_k_and_flags_restored():
    x, y, t = _small_data()
    model = P.make_cnn()
    model[0].weight.requires_grad_(False)  # a user's own freeze must survive
    before = _params(model)
    Distiller(16).distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=3, batch_size=16, trainable="head"))
    after = _params(model)
    names = [n for n, _ in model.named_parameters()]
    changed = {n for n, a, b in zip(names, before, after) if not torch.equal(a, b)}
    assert changed == {"9.weight", "9.bias"}
    assert [p.requires_grad for p in model.parameters()] == [n != "0.weight" for n in names]
    before = _params(model)
    Distiller(16).distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=3, batch_size=16, trainable="last-k", last_k=2))
    changed = {n for n, a, b in zip(names, before, _params(model)) if not torch.equal(a, b)}
    assert changed == {"7.weight", "7.bias", "9.weight", "9.bias"}


def test_prox_term_keeps_model_closer():
    x, y, t = _small_data()
    base = P.make_cnn()
    dist = {}
    for lam in (0.0, 50.0):
        model = copy.deepcopy(base)
        stats = Distiller(16).distill(
            model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=6, batch_size=16, lr=0.02, lambda_prox=lam, weight_decay=0)
        )
        dist[lam] = sum(float(((a - b) ** 2).sum()) for a, b in zip(_params(model), _params(base)))
        assert (stats["prox"] > 0) == (lam > 0)
    assert dist[50.0] < 0.5 * dist[0.0]


def test_pcl_only_aligns_features_with_prototypes_and_head_persists():
    x, y, t = _small_data(128)
    model = P.make_cnn()
    distiller = Distiller(16, head="mlp", hidden_dim=32)
    cfg = DistillConfig(lambda_self=0.0, steps=60, batch_size=32, lambda_ce=0, lambda_kl=0, lambda_pcl=1.0, optimizer="adam", lr=1e-3, weight_decay=0)

    def pcl_now():
        from clipfed_strategy.features import PenultimateExtractor

        with torch.no_grad():
            _, feats = PenultimateExtractor(model)(x)
            return float(prototype_contrastive_loss(distiller.head(feats), y, PROTOS, cfg.tau))

    distiller.distill(model, x, y, t, PROTOS, DistillConfig(steps=1, **{k: v for k, v in vars(cfg).items() if k != "steps"}))
    start = pcl_now()
    distiller.distill(model, x, y, t, PROTOS, cfg)
    assert pcl_now() < 0.75 * start
    state = distiller.state_dict()
    restored = Distiller(16, head="mlp")
    restored.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in restored.state_dict().items())
    with pytest.raises(DistillConfigError, match="mlp"):
        Distiller(16, head="linear").load_state_dict(state)
    with pytest.raises(DistillConfigError, match="embed_dim"):
        Distiller(8, head="mlp").load_state_dict(state)


def test_self_anchor_alone_removes_backdoor_without_a_teacher(backdoored):
    """λ_self only, teacher logits uninformative (all zero): the model is pulled towards its own
    predictions on each row's clean source, so the patched copies lose the trigger → target link
    and clean accuracy stays — trigger invariance that does not depend on the teacher's quality."""
    pb, x, y, _ = backdoored
    model = copy.deepcopy(pb.clients[0])
    acc0 = P.accuracy(model, pb.x_test, pb.y_test)
    asr0 = P.attack_success(model, pb.x_test, pb.y_test)
    rows = pb.aug_variant == 1
    source = torch.cat([torch.arange(len(pb.x_server)), pb.aug_source[rows]])
    with torch.no_grad():
        own = model.eval()(pb.x_server)[source]
    cfg = DistillConfig(epochs=6, lambda_ce=0.0, lambda_kl=0.0, lambda_pcl=0.0, lambda_self=2.0)
    stats = Distiller(16).distill(model, x, y, torch.zeros_like(own), None, cfg, self_logits=own)
    acc1 = P.accuracy(model, pb.x_test, pb.y_test)
    asr1 = P.attack_success(model, pb.x_test, pb.y_test)
    assert asr0 >= 0.5
    assert asr1 <= asr0 / 2, (asr0, asr1)
    assert acc1 >= acc0 - 0.04, (acc0, acc1)
    assert stats["self"] > 0 and math.isclose(stats["total"], 2.0 * stats["self"], rel_tol=1e-4)  # only λ_self counts


def test_defaults_with_source_index_remove_backdoor_with_a_weak_teacher(backdoored):
    """Default losses (self-anchor + a little KL + PCL), anchor computed inside from ``source_index``;
    the teacher is right on only 40 % of the rows and uniform elsewhere, and accuracy still holds."""
    pb, x, y, _ = backdoored
    rows = pb.aug_variant == 1
    source = torch.cat([torch.arange(len(pb.x_server)), pb.aug_source[rows]])  # indexes x's clean rows
    right = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < 0.4
    weak = torch.where(right[:, None], 5.0 * F.one_hot(y, 10).float(), torch.zeros(len(y), 10))
    model = copy.deepcopy(pb.clients[0])
    acc0 = P.accuracy(model, pb.x_test, pb.y_test)
    asr0 = P.attack_success(model, pb.x_test, pb.y_test)
    stats = Distiller(16).distill(model, x, y, weak, PROTOS, DistillConfig(epochs=6), source_index=source)
    acc1 = P.accuracy(model, pb.x_test, pb.y_test)
    asr1 = P.attack_success(model, pb.x_test, pb.y_test)
    assert asr0 >= 0.5 and asr1 <= asr0 / 2, (asr0, asr1)
    assert acc1 >= acc0 - 0.04, (acc0, acc1)
    assert stats["self"] > 0


def test_self_anchor_needs_self_logits():
    x, y, t = _small_data()
    with pytest.raises(ValueError, match="self_logits or source_index"):
        Distiller(16).distill(P.make_cnn(), x, y, t, None, DistillConfig(steps=1, lambda_pcl=0, lambda_self=1.0))
    with pytest.raises(ValueError, match="self_logits"):
        Distiller(16).distill(P.make_cnn(), x, y, t, None, DistillConfig(steps=1, lambda_pcl=0, lambda_self=1.0),
                              self_logits=t[:, :5])
    with pytest.raises(ValueError, match="source_index must have shape"):
        Distiller(16).distill(P.make_cnn(), x, y, t, None, DistillConfig(steps=1, lambda_pcl=0, lambda_self=1.0),
                              source_index=torch.arange(5))
    with pytest.raises(DistillConfigError, match="lambda"):
        DistillConfig(lambda_self=-1.0)


def test_config_and_input_validation():
    with pytest.raises(DistillConfigError, match="distill.optimizer"):
        DistillConfig(optimizer="lbfgs")
    with pytest.raises(DistillConfigError, match="distill.bn"):
        DistillConfig(bn="ema")
    with pytest.raises(DistillConfigError, match="distill.trainable"):
        DistillConfig(trainable="some")
    x, y, t = _small_data()
    with pytest.raises(ValueError, match="same number of rows"):
        Distiller(16).distill(P.make_cnn(), x, y[:5], t, PROTOS)
    src = torch.arange(len(x))
    with pytest.raises(ValueError, match="text_prototypes"):
        Distiller(16).distill(P.make_cnn(), x, y, t, None, source_index=src)
    with pytest.raises(ValueError, match="text_prototypes must be"):
        Distiller(16).distill(P.make_cnn(), x, y, t, PROTOS[:, :8], source_index=src)
    # without PCL no prototypes and no head are needed
    distiller = Distiller(16)
    stats = distiller.distill(P.make_cnn(), x, y, t, None, DistillConfig(lambda_self=0.0, steps=2, lambda_pcl=0))
    assert stats["pcl"] == 0 and distiller.state_dict() == {}


def test_named_feature_module_head():
    x, y, t = _small_data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    distiller = Distiller(16, feature_module="2")
    distiller.distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=2, batch_size=16))
    assert distiller.state_dict()["0.weight"].shape == (16, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_trains_fp32_model():
    x, y, t = _small_data()
    model = P.make_cnn().cuda()
    before = _params(model)
    stats = Distiller(16).distill(model, x, y, t, PROTOS, DistillConfig(lambda_self=0.0, steps=5, batch_size=16, amp=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("ce", "kl", "pcl", "total"))
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def test_self_gate_weights_rows_by_hand():
    """``self_gate``: the self-anchor term is the batch mean of gate · KL_row · T², the gate being 1
    where the anchor's top-1 is the intended label ("label") or the teacher's top-1 ("teacher")."""
    from clipfed_strategy.distillation import self_anchor_gate
    from clipfed_strategy.losses import kl_per_sample

    own = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 4.0]])
    labels = torch.tensor([0, 2, 2, 1])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 2.0]])
    assert self_anchor_gate(own, labels, teacher, "all") is None
    assert self_anchor_gate(own, labels, teacher, "label").tolist() == [1.0, 0.0, 1.0, 0.0]
    assert self_anchor_gate(own, labels, teacher, "teacher").tolist() == [0.0, 1.0, 1.0, 1.0]
    # "over": class 0 is 2 of 4 answers but 1 of 4 labels (ratio 2 reached): row 3 (label 1, answered 0) loses
    # the anchor; row 0 (answered 0, labelled 0) and the rows answered into other classes keep it
    assert self_anchor_gate(own, labels, teacher, "over").tolist() == [1.0, 1.0, 1.0, 1.0]  # no class at 2x
    own_over = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [4.0, 0.0, 1.0]])
    labels_over = torch.tensor([0, 2, 2, 1])
    assert self_anchor_gate(own_over, labels_over, teacher, "over").tolist() == [1.0, 1.0, 1.0, 0.0]
    assert self_anchor_gate(own_over, labels_over, teacher, "over", ratio=2.5).tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(DistillConfigError, match="self-gate"):
        DistillConfig(self_gate="some")
    with pytest.raises(DistillConfigError, match="self-gate-ratio"):
        DistillConfig(self_gate="over", self_gate_ratio=1.0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(4, 1, 2, 2)
    with torch.no_grad():
        student = model(x)
    T = 2.0
    expected = (kl_per_sample(student, own, T) * torch.tensor([1.0, 0.0, 1.0, 0.0])).mean() * T * T
    cfg = DistillConfig(steps=1, batch_size=4, T=T, lambda_kl=0.0, lambda_pcl=0.0, lambda_self=1.0, self_gate="label")
    stats = Distiller(3).distill(model, x, labels, teacher, None, cfg, self_logits=own)
    assert math.isclose(stats["self"], float(expected), rel_tol=1e-5)
    assert stats["self_gated"] == 0.5


def test_self_gate_label_does_not_anchor_a_model_that_answers_the_target_everywhere(backdoored):
    """A Blend-like backdoor that got in sends clean server images to its target. Anchored on every
    row (``all``), the distillation keeps that answer against the teacher; gated on the intended label,
    only the target-class rows are anchored, and the teacher pulls the rest back."""
    pb, x, y, teacher = backdoored
    on_target = 5.0 * F.one_hot(torch.zeros(len(y), dtype=torch.long), 10).float()  # the model's answer: class 0
    results = {}
    for gate in ("all", "label", "over"):
        model = copy.deepcopy(pb.clients[0])
        cfg = DistillConfig(epochs=4, lambda_kl=0.5, lambda_pcl=0.0, lambda_self=2.0, self_gate=gate)
        Distiller(16).distill(model, x, y, teacher, None, cfg, self_logits=on_target)
        with torch.no_grad():
            pred = model.eval()(pb.x_test).argmax(1)
        results[gate] = (float((pred == pb.y_test).float().mean()), float((pred[pb.y_test != 0] == 0).float().mean()))
    (acc_all, to0_all), (acc_label, to0_label) = results["all"], results["label"]
    assert to0_all >= 0.5, results  # anchored everywhere: the target answer stays
    assert to0_label <= to0_all / 3, results
    assert acc_label >= acc_all + 0.3, results
    assert results["over"][1] <= to0_all / 3 and results["over"][0] >= acc_all + 0.3, results  # class 0 is over-predicted
