import numpy as np
import pytest

from defense_testkit import DIM, as_state, client_state, prime, tiny_state, train_reply, trainable_delta
from server_app.defenses import DefenseConfigError, FoolsGold
from server_app.defenses.foolsgold import foolsgold_weights

BENIGN = [1, 2, 3, 4]
SYBILS = [7, 8, 9]


def round_updates(rng, sybil_noise=0.0):
    """4 diverse benign updates sharing a weak common part, 3 sybils pushing one direction."""
    common = np.full(DIM, 0.05)
    benign = [common + 0.2 * rng.normal(size=DIM) for _ in BENIGN]
    target = np.zeros(DIM)
    target[-3:] = [0.5, -0.5, 0.3]
    sybils = [target + sybil_noise * rng.normal(size=DIM) for _ in SYBILS]
    return benign, sybils


def test_foolsgold_weights_sybils_near_zero_and_benign_high():
    g = tiny_state()
    rng = np.random.default_rng(0)
    strategy = prime(FoolsGold(), g)
    for rnd in (1, 2):
        benign, sybils = round_updates(rng, sybil_noise=0.0 if rnd == 1 else 0.001)
        replies = [train_reply(client_state(g, u), n) for n, u in zip(BENIGN + SYBILS, benign + sybils)]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        rep = strategy.last_round_report
        assert all(rep["scores"][n] < 0.05 for n in SYBILS), rep["scores"]
        assert all(rep["scores"][n] > 0.5 for n in BENIGN), rep["scores"]
        assert set(SYBILS) <= set(rep["rejected"])
        w = np.array([rep["scores"][n] for n in BENIGN + SYBILS])
        ups = np.stack(benign + sybils)
        np.testing.assert_allclose(trainable_delta(as_state(arrays), g), w @ ups / w.sum(), atol=1e-5)
    # histories are per node id and accumulate over rounds
    assert set(strategy.history) == set(BENIGN + SYBILS)
    assert rep["history_clients"] == 7


def test_identical_sybils_get_exactly_zero_and_orthogonal_clients_one():
    h = np.zeros((5, 6))
    h[0, 0] = h[1, 1] = 1.0  # two honest, orthogonal
    h[2:, 2] = 1.0  # three identical sybils
    np.testing.assert_allclose(foolsgold_weights(h), [1, 1, 0, 0, 0])
    np.testing.assert_allclose(foolsgold_weights(h[:1]), [1])


def test_similarity_on_output_layer_only():
    g = tiny_state()
    rng = np.random.default_rng(1)
    # sybils agree on the output layer (last 9 coords) but hide behind random earlier layers
    ups = [3.0 * rng.normal(size=DIM) for _ in range(6)]
    for u in ups[3:]:
        u[-9:] = np.linspace(0.2, 0.4, 9)
    replies = [train_reply(client_state(g, u), n) for n, u in enumerate(ups, start=1)]
    everything = prime(FoolsGold(), g)
    everything.aggregate_train(1, replies)
    output = prime(FoolsGold(similarity_on="output"), g)
    output.aggregate_train(1, replies)
    assert all(output.last_round_report["scores"][n] == 0 for n in (4, 5, 6))
    assert min(everything.last_round_report["scores"][n] for n in (4, 5, 6)) > 0
    assert next(iter(output.history.values())).shape == (9,)


def test_all_identical_updates_keep_the_global_model():
    g = tiny_state()
    u = np.full(DIM, 0.1)
    strategy = prime(FoolsGold(), g)
    arrays, _ = strategy.aggregate_train(1, [train_reply(client_state(g, u), n) for n in (1, 2, 3)])
    assert strategy.last_round_report["kept_global"] is True
    np.testing.assert_array_equal(as_state(arrays)["fc.weight"], g["fc.weight"])


def test_foolsgold_settings_are_validated():
    with pytest.raises(DefenseConfigError, match="similarity_on"):
        FoolsGold(similarity_on="last")
    with pytest.raises(DefenseConfigError, match="kappa"):
        FoolsGold(kappa=0)
