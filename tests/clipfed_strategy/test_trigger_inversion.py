"""Trigger reconstruction from flagged client models (``clipfed_strategy.trigger_inversion``) and its
use by the core: the bank of reconstructed triggers in distillation and screening.

The digits federation's BadNets client stamps a 2×2 white patch in the bottom-right corner (→ class 0).
The tests use a server set whose only augmentation is a bright patch in the *top-left* corner, i.e.
a set that does not cover the trigger: there, screening misses the backdoored client and distillation
leaves its backdoor in place, and the reconstructed trigger is what fixes both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfed_strategy.config import CLIPFedConfig, CLIPFedConfigError
from clipfed_strategy.core import ClientUpdate
from clipfed_strategy.server_dataset import ServerDataset
from clipfed_strategy.trigger_inversion import (
    InversionConfig,
    InversionConfigError,
    Trigger,
    TriggerBank,
    invert_trigger,
)


def _helpers():
    from testkit import load_sibling

    return load_sibling(__file__, "conftest.py", "clipfed_strategy_tests_helpers")


H = _helpers()
P = H.digits_fl()
BACKDOOR = 5  # index of the BadNets client in the digits federation's roles


def np_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def fed_clients(digits_federation):
    fed = digits_federation
    clients = [fed.train_client(i, fed.global_state) for i in range(len(fed.roles))]
    global_model = P.make_cnn()
    global_model.load_state_dict(fed.global_state)
    return fed, clients, global_model


@pytest.fixture(scope="module")
def top_left_only(digits_federation) -> ServerDataset:
    """The federation's server set restricted to clean rows + bright top-left patches (variant 2)."""
    sds = digits_federation.server_set
    rows = np.flatnonzero(np.isin(sds.variants, [0, 2]))
    return ServerDataset(sds.images[rows], sds.labels[rows], sds.variants[rows], sds.source_index[rows],
                         sds.class_names, variant_names=sds.variant_names)


def _corner_share(trigger: Trigger) -> float:
    m = trigger.mask[0]
    return float(m[-3:, -3:].sum() / m.sum())


def _test_flips(trigger: Trigger, model, fed) -> float:
    x = trigger.apply(fed.x_test[fed.y_test != P.TARGET])
    with torch.no_grad():
        model.eval()
        return float((model(x).argmax(1) == P.TARGET).float().mean())


# --------------------------------------------------------------------------- inversion itself


def test_inversion_recovers_the_backdoor_patch_and_only_it(fed_clients):
    fed, clients, g = fed_clients
    x = torch.from_numpy(fed.server_set.images[fed.server_set.variants == 0]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(fed.server_set.labels[fed.server_set.variants == 0])
    trig = invert_trigger(clients[BACKDOOR], x, y, P.TARGET, InversionConfig(), seed=0, reference=g)
    assert trig.flip_rate >= 0.9 and trig.ref_flip_rate <= 0.1, (trig.flip_rate, trig.ref_flip_rate)
    assert _corner_share(trig) >= 0.5, _corner_share(trig)  # measured 0.69-0.81: the bottom-right corner
    assert trig.mask_mean <= 0.1  # the true trigger covers 4/64 = 0.0625 of the image
    # specific: on unseen test digits it flips the backdoored model, not the benign ones or the global model
    assert _test_flips(trig, clients[BACKDOOR], fed) >= 0.9
    assert max(_test_flips(trig, clients[i], fed) for i in range(len(clients)) if i != BACKDOOR) <= 0.2
    assert _test_flips(trig, g, fed) <= 0.2


def test_inverting_a_benign_model_needs_a_larger_mask(fed_clients):
    fed, clients, g = fed_clients
    x = torch.from_numpy(fed.server_set.images[fed.server_set.variants == 0]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(fed.server_set.labels[fed.server_set.variants == 0])
    bad = invert_trigger(clients[BACKDOOR], x, y, P.TARGET, InversionConfig(), seed=0, reference=g)
    benign = invert_trigger(clients[0], x, y, P.TARGET, InversionConfig(), seed=0, reference=g)
    assert benign.mask_mean >= 2 * bad.mask_mean, (benign.mask_mean, bad.mask_mean)  # measured 0.18 vs 0.05
    assert _corner_share(benign) < 0.5


def test_inversion_leaves_the_models_untouched_and_refuses_bad_input(fed_clients):
    fed, clients, g = fed_clients
    model = clients[BACKDOOR]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.rand(20, 1, 8, 8)
    invert_trigger(model, x, torch.arange(20) % 10, 0, InversionConfig(steps=2), reference=g)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    with pytest.raises(ValueError, match="no clean rows outside the target class 3"):
        invert_trigger(model, x, torch.full((20,), 3), 3, InversionConfig(steps=2))
    with pytest.raises(ValueError, match="one label per row"):
        invert_trigger(model, x, torch.zeros(5, dtype=torch.long), 0, InversionConfig(steps=2))


def test_config_keys_are_read_and_checked():
    assert not CLIPFedConfig.from_run_config({}).invert.enabled and not CLIPFedConfig().invert.screen
    cfg = CLIPFedConfig.from_run_config({"invert-enabled": "false", "invert-steps": 40, "invert-batch": 64,
                                         "invert-mask-l1": 3.0, "invert-bank-size": 2, "invert-screen": False})
    assert (cfg.invert.enabled, cfg.invert.steps, cfg.invert.batch_size, cfg.invert.mask_l1, cfg.invert.bank_size,
            cfg.invert.screen) == (False, 40, 64, 3.0, 2, False)
    with pytest.raises(CLIPFedConfigError, match="invert-min-flip must be in"):
        CLIPFedConfig.from_run_config({"invert-min-flip": 1.5})
    with pytest.raises(CLIPFedConfigError, match="invert-steps"):
        CLIPFedConfig.from_run_config({"invert-steps": "many"})
    with pytest.raises(InversionConfigError, match="invert-bank-size"):
        InversionConfig(bank_size=0)


def test_bank_keeps_the_most_recent_and_stamps_non_target_rows():
    bank = TriggerBank(size=2)
    for t in range(3):
        mask = torch.zeros(1, 4, 4)
        mask[0, t, t] = 1.0
        bank.add(Trigger(mask, torch.full((1, 4, 4), 0.5), target=t, flip_rate=1.0, round=t))
    assert [t.round for t in bank.triggers] == [1, 2]
    x = torch.zeros(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    images, pos, which = bank.stamped_rows(x, y)
    assert pos.tolist() == [0, 2, 3, 5, 0, 1, 3, 4] and which.tolist() == [0] * 4 + [1] * 4  # target rows skipped
    assert images[0, 0, 1, 1] == 0.5 and images[0].sum() == 0.5  # one stamped pixel
    restored = TriggerBank(size=2)
    restored.load_state_dict(bank.state_dict())
    assert [(t.target, t.round) for t in restored.triggers] == [(1, 1), (2, 2)]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(bank.triggers, restored.triggers))


# --------------------------------------------------------------------------- the core with a bank


def test_screening_banks_the_flagged_clients_trigger(fed_clients):
    fed, clients, g = fed_clients
    d = H.make_defense(P.make_cnn(), fed.server_set, invert=InversionConfig(enabled=True))
    ups = [ClientUpdate(str(i), np_state(m), 250.0) for i, m in enumerate(clients)]
    out = d.screen(1, np_state(g), ups)
    assert out.flagged == [i == BACKDOOR for i in range(len(clients))]
    (entry,) = out.info["inversion"]["triggers"]
    assert entry["client"] == str(BACKDOOR) and entry["target"] == P.TARGET and entry["kept"]
    assert len(d.bank) == 1 and _corner_share(d.bank.triggers[0]) >= 0.5
    restored = H.make_defense(P.make_cnn(), fed.server_set, invert=InversionConfig(enabled=True))  # checkpointed
    restored.load_state_dict(d.state_dict())
    assert torch.equal(restored.bank.triggers[0].mask, d.bank.triggers[0].mask)
    off = H.make_defense(P.make_cnn(), fed.server_set)  # the default: off
    assert "inversion" not in off.screen(1, np_state(g), ups).info and len(off.bank) == 0


def test_the_bank_finds_and_removes_a_backdoor_the_server_set_does_not_cover(fed_clients, top_left_only):
    fed, clients, g = fed_clients
    ups = [ClientUpdate(str(i), np_state(m), 250.0) for i, m in enumerate(clients)]
    backdoored = clients[BACKDOOR]
    asr0 = P.attack_success(backdoored, fed.x_test, fed.y_test)
    acc0 = P.accuracy(backdoored, fed.x_test, fed.y_test)

    plain = H.make_defense(P.make_cnn(), top_left_only, invert=InversionConfig(enabled=True))
    missed = plain.screen(1, np_state(g), ups)
    assert not any(missed.flagged)  # the top-left patches do not reveal a bottom-right trigger
    state, _ = plain.distill(1, {k: v.clone() for k, v in backdoored.state_dict().items()})
    kept = P.make_cnn()
    kept.load_state_dict(state)
    assert P.attack_success(kept, fed.x_test, fed.y_test) >= 0.8 * asr0  # measured 1.00 -> 1.00

    # A trigger reconstructed in an earlier round (here: from the backdoored client itself).
    d = H.make_defense(P.make_cnn(), top_left_only, invert=InversionConfig(enabled=True, screen=True))
    xc, yc = d.x[d.clean_rows], d.y[d.clean_rows]
    d.bank.add(invert_trigger(backdoored, xc, yc, P.TARGET, d.config.invert, seed=0, reference=g))
    caught = d.screen(2, np_state(g), ups)
    assert caught.flagged == [i == BACKDOOR for i in range(len(clients))]
    assert len(d.bank) == 2  # and the flagged client's own reconstruction joined the bank
    state, stats = d.distill(2, {k: v.clone() for k, v in backdoored.state_dict().items()})
    assert stats["trigger_rows"] == 2 * int((yc != P.TARGET).sum())
    cleaned = P.make_cnn()
    cleaned.load_state_dict(state)
    asr1 = P.attack_success(cleaned, fed.x_test, fed.y_test)
    acc1 = P.accuracy(cleaned, fed.x_test, fed.y_test)
    # measured 1.00 -> 0.00 in session 4 and 1.00 -> 0.25 on a machine of 2026-12 (same code, same torch: the
    # CPUs' float differences change the federation's training); without the bank it stays at 1.00 (above)
    assert asr0 >= 0.9 and asr1 <= 0.35, (asr0, asr1)
    assert acc1 >= acc0 - 0.1, (acc0, acc1)  # needs distill-grad-clip (0.92 -> 0.14 without it)
