"""``CLIPFedDefense``: the framework-free core (validate → screen → distil) with hand-made teacher outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfed_strategy.core import ClientUpdate, clip_to_median_norm, teacher_label
from clipfed_strategy.validation import update_norm


def _helpers():
    """This directory's conftest.py as a module (its plain helper functions)."""
    from testkit import load_sibling

    return load_sibling(__file__, "conftest.py", "clipfed_strategy_tests_helpers")


H = _helpers()
BACKDOOR = 5


def np_state(model_or_state) -> dict[str, np.ndarray]:
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


# --------------------------------------------------------------------------- construction


def test_rows_and_teacher_outputs_are_wired(small_server_set):
    sds = small_server_set
    d = H.make_defense(H.tiny_net(0), sds)
    clean = np.flatnonzero(sds.variants == 0)
    aug = np.flatnonzero(sds.variants > 0)
    assert d.clean_rows.tolist() == clean.tolist() and d.aug_rows.tolist() == aug.tolist()
    # position (within the clean rows) of every augmented row's source image
    assert d.aug_source_pos.tolist() == [int(np.flatnonzero(clean == s)[0]) for s in sds.source_index[aug]]
    assert d.x.shape == (len(sds), 1, 8, 8) and d.x.dtype == torch.float32
    assert float(d.x.min()) >= 0.0 and float(d.x.max()) <= 1.0
    assert torch.allclose(d.text_prototypes.norm(dim=1), torch.ones(10))
    assert d.param_names == list(H.tiny_net(0).state_dict())


def test_teacher_outputs_must_cover_every_row(small_server_set):
    logits, emb, protos = H.teacher_arrays(small_server_set)
    from clipfed_strategy.config import CLIPFedConfig
    from clipfed_strategy.core import CLIPFedDefense

    with pytest.raises(ValueError, match=f"cover {len(logits) - 1} rows, the server dataset has {len(logits)}"):
        CLIPFedDefense(H.tiny_net(0), small_server_set, logits[:-1], emb, protos, {"identity": "x"},
                       CLIPFedConfig(device="cpu"))


def test_template_model_is_not_changed(small_server_set):
    model = H.tiny_net(0)
    before = np_state(model)
    d = H.make_defense(model, small_server_set, distill={"steps": 2, "batch_size": 32})
    d.distill(1, {k: torch.from_numpy(v) for k, v in before.items()})
    assert all(np.array_equal(before[k], v) for k, v in np_state(model).items())


def test_teacher_label_never_calls_a_stand_in_clip():
    assert teacher_label("open_clip:ViT-B-32:openai", False) == "CLIP teacher: open_clip:ViT-B-32:openai"
    label = teacher_label("open_clip:clipfed-standin-digits:/c.pt@ab", True)
    assert label.startswith("STAND-IN teacher") and "NOT CLIP" in label


# --------------------------------------------------------------------------- validate and screen


def test_validate_delegates_to_the_configured_limits(small_server_set):
    from clipfed_strategy.validation import ValidationConfig

    d = H.make_defense(H.tiny_net(0), small_server_set, validation=ValidationConfig(max_num_examples=100))
    g = np_state(H.tiny_net(0))
    bad = dict(g, **{"fc2.bias": np.full(10, np.nan, np.float32)})
    assert d.validate(g, [(g, 10), (bad, 10), (g, 0), (g, 101)]) == [
        None, "parameter 'fc2.bias' contains NaN or Inf", "num-examples must be a positive integer, got 0",
        "num-examples 101 is absurd (> 100)"]


def _updates(n: int, scale: float = 0.01) -> tuple[dict, list[ClientUpdate]]:
    g = np_state(H.tiny_net(0))
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        s = {k: (v + scale * (i + 1) * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
             for k, v in g.items()}
        out.append(ClientUpdate(str(i), s, 10.0 * (i + 1)))
    return g, out


def test_screening_disabled_passes_everyone_with_their_counts(small_server_set):
    d = H.make_defense(H.tiny_net(0), small_server_set, screen={"enabled": False})
    g, ups = _updates(4)
    out = d.screen(1, g, ups)
    assert out.weights == [10.0, 20.0, 30.0, 40.0] and out.flagged == [False] * 4
    assert out.enforced is False and all(s is u.state for s, u in zip(out.states, ups))


def test_too_few_clients_are_scored_but_not_acted_on(small_server_set):
    d = H.make_defense(H.tiny_net(0), small_server_set, screen={"min_clients": 3})
    g, ups = _updates(2)
    out = d.screen(1, g, ups)
    assert out.enforced is False and out.weights == [10.0, 20.0]
    assert all("score" in r for r in out.records)


def test_batched_and_looped_screening_agree(small_server_set):
    g, ups = _updates(5)
    batched = H.make_defense(H.tiny_net(0), small_server_set, screen={"batched": True, "chunk_size": 2})
    looped = H.make_defense(H.tiny_net(0), small_server_set, screen={"batched": False})
    lb, _ = batched.client_logits([u.state for u in ups], need_features=False)
    ll, _ = looped.client_logits([u.state for u in ups], need_features=False)
    assert lb.shape == (5, len(small_server_set), 10)
    torch.testing.assert_close(lb, ll, rtol=1e-4, atol=1e-5)
    rb, rl = batched.screen(1, g, ups), looped.screen(1, g, ups)
    assert rb.weights == rl.weights
    assert [r["score"] for r in rb.records] == pytest.approx([r["score"] for r in rl.records], abs=1e-4)


def test_models_with_non_finite_outputs_are_dropped_and_do_not_blind_screening(small_server_set):
    """Screening after validation normally; called directly, a model whose outputs are NaN (negative
    BatchNorm variances) must be dropped with a reason, and the others judged as without it."""
    d = H.make_defense(H.tiny_net(0), small_server_set)
    g, ups = _updates(5)
    broken = dict(ups[2].state, **{"bn.running_var": np.full(4, -1.0, np.float32)})
    with_broken = [ups[0], ups[1], ClientUpdate("2", broken, 30.0), ups[3], ups[4]]
    out = d.screen(1, g, with_broken)
    alone = d.screen(1, g, [ups[i] for i in (0, 1, 3, 4)])
    assert out.weights[2] == 0.0 and out.flagged[2] is True
    assert out.records[2]["reason"] == "non-finite outputs (NaN/Inf) on the server dataset"
    assert "score" not in out.records[2]
    assert [out.weights[i] for i in (0, 1, 3, 4)] == alone.weights
    assert [out.records[i]["score"] for i in (0, 1, 3, 4)] == [r["score"] for r in alone.records]
    assert out.enforced is True


def test_distillation_that_diverges_keeps_the_aggregate(small_server_set):
    d = H.make_defense(H.tiny_net(0), small_server_set, distill={"steps": 2, "batch_size": 32})
    state = {k: torch.from_numpy(v) for k, v in np_state(H.tiny_net(0)).items()}
    state["bn.running_var"] = torch.full((4,), -1.0)  # NaN forward pass -> NaN loss -> NaN weights
    out, stats = d.distill(1, state)
    assert stats["non_finite"] == 1.0
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_clip_to_median_norm_by_hand():
    g = {"w": np.zeros(2, np.float32), "bn.running_mean": np.zeros(1, np.float32), "n": np.array(3, np.int64)}

    def s(x, y, rm=0.0):
        return {"w": np.array([x, y], np.float32), "bn.running_mean": np.array([rm], np.float32),
                "n": np.array(9, np.int64)}

    states = [s(3, 4), s(0, 1), s(0, 2), s(30, 40, rm=7.0)]
    out, limit = clip_to_median_norm(states, g, [True, True, True, False])
    assert limit == pytest.approx(2.0)  # median of 5, 1, 2 (the dropped client's norm does not count)
    np.testing.assert_allclose(out[0]["w"], [1.2, 1.6], rtol=1e-6)
    assert out[1] is states[1] and out[2] is states[2]  # at or below the median: untouched
    np.testing.assert_allclose(out[3]["w"], [1.2, 1.6], rtol=1e-6)
    assert out[3]["bn.running_mean"][0] == 7.0 and out[3]["n"] == 9  # statistics and counters untouched
    assert out[0]["w"].dtype == np.float32 and out[3]["n"].shape == ()
    assert clip_to_median_norm(states, g, [False] * 4) == (states, None)


def test_screen_with_median_clipping_reports_the_limit(small_server_set):
    d = H.make_defense(H.tiny_net(0), small_server_set, screen={"clip_norm": "median"})
    g, ups = _updates(5)
    out = d.screen(1, g, ups)
    norms = [update_norm(u.state, g) for u in ups]
    kept = [nrm for nrm, w in zip(norms, out.weights) if w > 0]
    assert out.clip_norm == pytest.approx(float(np.median(kept)))
    assert max(update_norm(st, g) for st in out.states) <= out.clip_norm * (1 + 1e-5)


# --------------------------------------------------------------------------- distil


def test_distillation_schedule(small_server_set):
    d = H.make_defense(H.tiny_net(0), small_server_set, distill_start_round=2, distill_every=3)
    assert [r for r in range(1, 10) if d.should_distill(r)] == [2, 5, 8]
    state = {k: torch.from_numpy(v) for k, v in np_state(H.tiny_net(3)).items()}
    out, stats = d.distill(3, state)
    assert stats == {} and all(out[k] is state[k] for k in state)
    off = H.make_defense(H.tiny_net(0), small_server_set, distill_enabled=False)
    assert not any(off.should_distill(r) for r in range(1, 5))


@pytest.mark.parametrize("data, teacher_input", [("clean+aug", "clean"), ("clean", "clean"), ("aug", "aug"),
                                                 ("aug", "clean")])
def test_distill_feeds_the_configured_rows_and_teacher_targets(small_server_set, monkeypatch, data, teacher_input):
    sds = small_server_set
    d = H.make_defense(H.tiny_net(0), sds, distill_data=data, distill_teacher_input=teacher_input)
    d.teacher_logits = torch.arange(len(sds), dtype=torch.float32)[:, None].repeat(1, 10)  # row id as logit
    seen = {}

    def fake(model, x, labels, teacher_logits, protos, cfg, self_logits=None):
        seen.update(x=x, labels=labels, teacher=teacher_logits, protos=protos, seed=cfg.seed, own=self_logits)
        return {"steps": 0}

    monkeypatch.setattr(d.distiller, "distill", fake)
    aggregated = H.tiny_net(0)
    d.distill(4, {k: torch.from_numpy(v) for k, v in np_state(aggregated).items()})
    rows = {"clean+aug": np.arange(len(sds)), "clean": np.flatnonzero(sds.variants == 0),
            "aug": np.flatnonzero(sds.variants > 0)}[data]
    assert torch.equal(seen["x"], d.x[rows]) and seen["labels"].tolist() == sds.labels[rows].tolist()
    teacher_rows = sds.source_index[rows] if teacher_input == "clean" else rows
    assert seen["teacher"][:, 0].long().tolist() == teacher_rows.tolist()
    assert seen["seed"] == d.config.distill.seed + 4  # a fresh shuffle every round, reproducible
    # the self-anchor: the aggregated model's own logits on each row's clean source
    with torch.no_grad():
        own = aggregated.eval()(d.x[torch.from_numpy(sds.source_index[rows])].float())
    assert torch.allclose(seen["own"], own, atol=1e-5)


def test_prototype_kinds(small_server_set):
    sds = small_server_set
    text = H.make_defense(H.tiny_net(0), sds, distill_proto="text")
    assert torch.equal(text.prototypes(), text.text_prototypes)
    image = H.make_defense(H.tiny_net(0), sds, distill_proto="image").prototypes()
    clean = torch.from_numpy(np.flatnonzero(sds.variants == 0))
    for c in range(10):
        rows = clean[torch.from_numpy(sds.labels[clean.numpy()] == c)]
        torch.testing.assert_close(image[c], F.normalize(text.teacher_emb[rows].mean(0), dim=0))
    mix = H.make_defense(H.tiny_net(0), sds, distill_proto="mix").prototypes()
    torch.testing.assert_close(mix, F.normalize(image + text.text_prototypes, dim=-1))
    assert torch.allclose(mix.norm(dim=1), torch.ones(10))


@pytest.fixture(scope="module")
def backdoored(digits_federation):
    """The BadNets client of the digits federation (2×2 bottom-right patch → class 0)."""
    fed = digits_federation
    return fed, fed.train_client(BACKDOOR, fed.global_state)


def test_distill_lowers_a_backdoored_models_asr(backdoored):
    P = H.digits_fl()
    fed, model = backdoored
    asr0, acc0 = P.attack_success(model, fed.x_test, fed.y_test), P.accuracy(model, fed.x_test, fed.y_test)
    d = H.make_defense(P.make_cnn(), fed.server_set, distill={"epochs": 2})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new_state, stats = d.distill(1, state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # input not modified
    cleaned = P.make_cnn()
    cleaned.load_state_dict(new_state)
    asr1, acc1 = P.attack_success(cleaned, fed.x_test, fed.y_test), P.accuracy(cleaned, fed.x_test, fed.y_test)
    assert asr0 >= 0.8, asr0
    assert asr1 <= asr0 / 2, (asr0, asr1)  # measured: 1.00 -> 0.00
    assert acc1 >= acc0 - 0.05, (acc0, acc1)  # measured: 0.920 -> 0.892
    assert stats["steps"] == 2 * int(np.ceil(len(fed.server_set) / 128)) and stats["kl"] > 0 and stats["pcl"] > 0
    assert all(v.device.type == "cpu" for v in new_state.values())


def test_projection_head_state_round_trips(small_server_set):
    cfg = {"distill": {"steps": 3, "batch_size": 32}}
    a = H.make_defense(H.tiny_net(0), small_server_set, **cfg)
    assert a.state_dict() == {"head": {}, "triggers": [], "score_history": {}}  # no head or banked trigger before the first round
    state = {k: torch.from_numpy(v) for k, v in np_state(H.tiny_net(5)).items()}
    a.distill(1, state)
    saved = copy.deepcopy(a.state_dict())
    assert set(saved["head"]) == {"0.weight", "0.bias"} and saved["head"]["0.weight"].shape == (H.EMBED_DIM, 16)
    b = H.make_defense(H.tiny_net(0), small_server_set, **cfg)
    b.load_state_dict(saved)
    fresh = H.make_defense(H.tiny_net(0), small_server_set, **cfg)
    out_a, _ = a.distill(2, state)
    out_b, _ = b.distill(2, state)
    out_fresh, _ = fresh.distill(2, state)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)  # restored head == continued head
    assert not all(torch.equal(out_a[k], out_fresh[k]) for k in out_a)  # the head matters
    assert all(torch.equal(a.state_dict()["head"][k], b.state_dict()["head"][k]) for k in saved["head"])


def test_score_history_follows_client_ids_across_rounds_and_checkpoints(small_server_set):
    from clipfed_strategy.config import CLIPFedConfigError, ScreeningConfig

    d = H.make_defense(H.tiny_net(0), small_server_set, screen={"history": 0.5, "min_collapse": 0.0})
    g, ups = _updates(5)
    first = d.screen(1, g, ups)
    assert set(d.score_history) == {u.client_id for u in ups}
    assert [d.score_history[u.client_id] for u in ups] == pytest.approx([r["score"] for r in first.records])
    # round 2: client "4" is absent, a new client "9" joins; the others are averaged with their past
    second_ups = ups[:4] + [ClientUpdate("9", ups[4].state, 50.0)]
    before = dict(d.score_history)
    second = d.screen(2, g, second_ups)
    for u, rec in zip(second_ups, second.records):
        if u.client_id in before:
            assert rec["score"] == pytest.approx(0.5 * rec.get("round_score", rec["score"]) + 0.5 * before[u.client_id])
        else:
            assert "round_score" not in rec  # first appearance: this round alone
    assert d.score_history["4"] == before["4"]  # an absent client keeps its history
    restored = H.make_defense(H.tiny_net(0), small_server_set, screen={"history": 0.5})
    restored.load_state_dict(d.state_dict())
    assert restored.score_history == d.score_history
    with pytest.raises(CLIPFedConfigError, match="screen-history"):
        ScreeningConfig(history=1.0)


def test_warmup_rounds_decide_with_their_own_threshold(small_server_set):
    """``screen-warmup-rounds``: rounds 1..W use ``warmup_z_thr``, later rounds ``z_thr``; the scores
    themselves do not change."""
    from clipfed_strategy.config import CLIPFedConfigError, ScreeningConfig

    g, ups = _updates(6, scale=0.1)
    screen = {"min_collapse": 0.0, "w_kl": 1.0, "combine": "max", "z_thr": 50.0, "warmup_rounds": 2, "warmup_z_thr": 0.0,
              "max_reject_frac": 1.0}
    d = H.make_defense(H.tiny_net(0), small_server_set, screen=screen)
    warm, later = d.screen(2, g, ups), d.screen(3, g, ups)
    assert [r["score"] for r in warm.records] == pytest.approx([r["score"] for r in later.records])
    above = sum(r["score"] > 0 for r in warm.records)
    assert above >= 1
    assert all(r.get("score") is not None for r in warm.records)
    assert sum(warm.flagged) == above  # every positive score crosses the warm-up threshold 0
    assert sum(later.flagged) == 0  # nobody reaches z 50
    with pytest.raises(CLIPFedConfigError, match="screen-warmup-rounds"):
        ScreeningConfig(warmup_rounds=-1)


def test_ensemble_self_anchor_is_the_kept_clients_weighted_mean(small_server_set, monkeypatch):
    """``distill-self-source=ensemble``: the self-anchor targets are the screening-weighted mean logits of the
    round's kept client models on each row's clean source; a dropped client contributes nothing."""
    sds = small_server_set
    d = H.make_defense(H.tiny_net(0), sds, distill_self_source="ensemble", screen={"min_clients": 3})
    models = [H.tiny_net(s) for s in (1, 2, 3, 4)]
    updates = [ClientUpdate(f"c{i}", np_state(m), float(10 * (i + 1))) for i, m in enumerate(models)]
    _drop_c2(monkeypatch)
    outcome = d.screen(7, np_state(H.tiny_net(0)), updates)
    assert outcome.weights[2] == 0.0 and all(outcome.weights[i] > 0 for i in (0, 1, 3))
    seen = {}

    def fake(model, x, labels, teacher_logits, protos, cfg, self_logits=None):
        seen["own"] = self_logits
        return {"steps": 0}

    monkeypatch.setattr(d.distiller, "distill", fake)
    _, stats = d.distill(7, {k: torch.from_numpy(v) for k, v in np_state(H.tiny_net(0)).items()})
    src = torch.from_numpy(sds.source_index)
    with torch.no_grad():
        per_model = [m.eval()(d.x[src].float()) for m in models]
    w = [outcome.weights[i] for i in range(4)]
    expected = sum(w[i] * per_model[i] for i in range(4)) / sum(w)
    assert stats["self_from_ensemble"] == 1.0
    torch.testing.assert_close(seen["own"], expected, atol=1e-5, rtol=1e-5)
    # another round without screening of its own: the anchor falls back to the aggregated model, and says so
    _, stats = d.distill(8, {k: torch.from_numpy(v) for k, v in np_state(H.tiny_net(0)).items()})
    assert stats["self_from_ensemble"] == 0.0
    with torch.no_grad():
        torch.testing.assert_close(seen["own"], H.tiny_net(0).eval()(d.x[src].float()), atol=1e-5, rtol=1e-5)


def test_ensemble_self_anchor_without_screening_uses_every_client(small_server_set, monkeypatch):
    sds = small_server_set
    d = H.make_defense(H.tiny_net(0), sds, distill_self_source="ensemble", screen={"enabled": False})
    models = [H.tiny_net(s) for s in (1, 2)]
    d.screen(1, np_state(H.tiny_net(0)), [ClientUpdate(f"c{i}", np_state(m), n) for i, (m, n) in enumerate(zip(models, (1.0, 3.0)))])
    with torch.no_grad():
        expected = (models[0].eval()(d.x.float()) + 3 * models[1].eval()(d.x.float())) / 4
    torch.testing.assert_close(d.ensemble_logits(1), expected, atol=1e-5, rtol=1e-5)
    assert d.ensemble_logits(2) is None


# --------------------------------------------------------------------------- screen-purify


def _drop_c2(monkeypatch):
    """Make screening drop client index 2 (the decision itself is not under test)."""
    import clipfed_strategy.core as core_mod

    real_screen = core_mod.screen

    def drop_c2(scores, *a, **kw):
        dec = real_screen(scores, *a, **kw)
        dec.weights = np.array([0.0 if i == 2 else w for i, w in enumerate(dec.weights)])
        dec.flagged = np.array([i == 2 for i in range(len(dec.weights))])
        return dec

    monkeypatch.setattr(core_mod, "screen", drop_c2)


def test_purify_distils_the_dropped_model_towards_the_kept_ones_and_readmits_it(small_server_set, monkeypatch):
    sds = small_server_set
    d = H.make_defense(H.tiny_net(0), sds, screen={"min_clients": 3, "purify": True, "purify_weight": 0.5,
                                                    "purify_steps": 3})
    models = [H.tiny_net(s) for s in (1, 2, 3, 4)]
    updates = [ClientUpdate(f"c{i}", np_state(m), float(10 * (i + 1))) for i, m in enumerate(models)]
    _drop_c2(monkeypatch)
    seen = {}
    real_distill = d.distiller.distill

    def spy(model, x, labels, teacher_logits, protos, cfg, self_logits=None):
        seen.update(self_logits=self_logits, protos=protos, cfg=cfg)
        return real_distill(model, x, labels, teacher_logits, protos, cfg, self_logits=self_logits)

    monkeypatch.setattr(d.distiller, "distill", spy)
    out = d.screen(4, np_state(H.tiny_net(0)), updates)
    assert out.purified == [False, False, True, False]
    assert out.flagged[2] and out.records[2]["purified"] is True
    assert out.weights == [10.0, 20.0, 0.5 * 30.0, 40.0]
    assert [out.states[i] is updates[i].state for i in range(4)] == [True, True, False, True]
    assert any(not np.array_equal(out.states[2][k], updates[2].state[k]) for k in updates[2].state)
    assert all(out.states[2][k].dtype == updates[2].state[k].dtype for k in updates[2].state)
    # the anchor: the kept clients' example-weighted mean logits on each row's clean source; no PCL
    src = torch.from_numpy(sds.source_index)
    with torch.no_grad():
        per_model = [m.eval()(d.x[src].float()) for m in models]
    expected = (10 * per_model[0] + 20 * per_model[1] + 40 * per_model[3]) / 70
    torch.testing.assert_close(seen["self_logits"], expected, atol=1e-5, rtol=1e-5)
    assert seen["protos"] is None and seen["cfg"].lambda_pcl == 0.0 and seen["cfg"].steps == 3
    assert out.info["purify"]["clients"][0]["purified"] is True


def test_purify_keeps_a_model_that_diverges_dropped(small_server_set, monkeypatch):
    d = H.make_defense(H.tiny_net(0), small_server_set, screen={"min_clients": 3, "purify": True, "purify_steps": 2})
    updates = [ClientUpdate(f"c{i}", np_state(H.tiny_net(i + 1)), 10.0) for i in range(4)]
    _drop_c2(monkeypatch)

    def diverge(model, *a, **kw):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return {"total": float("nan")}

    monkeypatch.setattr(d.distiller, "distill", diverge)
    out = d.screen(1, np_state(H.tiny_net(0)), updates)
    assert out.weights[2] == 0.0 and out.purified[2] is False and out.states[2] is updates[2].state
    assert out.info["purify"]["clients"][0]["purified"] is False


def test_purify_settings_are_checked():
    from clipfed_strategy.config import CLIPFedConfig, CLIPFedConfigError, ScreeningConfig

    with pytest.raises(CLIPFedConfigError, match="screen-purify-weight"):
        ScreeningConfig(purify=True, purify_weight=0.0)
    with pytest.raises(CLIPFedConfigError, match="screen-purify-steps"):
        ScreeningConfig(purify_steps=-1)
    with pytest.raises(CLIPFedConfigError, match="screen-mode"):
        ScreeningConfig(purify=True, mode="soft")
    cfg = CLIPFedConfig.from_run_config({"screen-purify": "true", "screen-purify-weight": 0.25, "screen-purify-steps": 5})
    assert (cfg.screen.purify, cfg.screen.purify_weight, cfg.screen.purify_steps) == (True, 0.25, 5)
