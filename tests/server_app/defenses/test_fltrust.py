import numpy as np
import pytest

from defense_testkit import DIM, TRAINABLE, as_state, client_state, prime, tiny_state, train_reply, trainable_delta
from server_app.defenses import DefenseConfigError, FLTrust
from server_app.defenses import update_math as um

G0 = np.linspace(-1.0, 1.0, DIM) * 0.2  # the server's own update


def server_fn_recording(calls):
    def server_update_fn(global_state, server_round):
        calls.append((server_round, sorted(global_state)))
        return um.unflatten(G0, global_state, TRAINABLE)

    return server_update_fn


def test_fltrust_gives_zero_trust_to_an_update_opposite_to_the_server_update():
    g = tiny_state()
    rng = np.random.default_rng(0)
    benign = [G0 * s + 0.02 * rng.normal(size=DIM) for s in (0.5, 2.0, 4.0)]
    attack = -10.0 * G0
    nodes = [1, 2, 3, 4]
    replies = [train_reply(client_state(g, u), n) for n, u in zip(nodes, benign + [attack])]
    calls = []
    strategy = prime(FLTrust(server_update_fn=server_fn_recording(calls)), g)
    arrays, _ = strategy.aggregate_train(5, replies)
    assert calls == [(5, sorted(g))]
    rep = strategy.last_round_report
    assert rep["scores"][4] == 0.0 and rep["rejected"] == [4] and rep["accepted"] == [1, 2, 3]
    assert all(rep["scores"][n] > 0.9 for n in (1, 2, 3))
    # expected: trust-weighted mean of updates rescaled to |g0|
    ups = np.stack(benign)
    trust = np.maximum(ups @ G0 / (np.linalg.norm(ups, axis=1) * np.linalg.norm(G0)), 0)
    rescaled = ups * (np.linalg.norm(G0) / np.linalg.norm(ups, axis=1))[:, None]
    expected = (trust[:, None] * rescaled).sum(axis=0) / trust.sum()
    delta = trainable_delta(as_state(arrays), g)
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    assert np.linalg.norm(delta) <= np.linalg.norm(G0) * (1 + 1e-5)  # a huge update cannot dominate
    assert rep["server_update_norm"] == pytest.approx(np.linalg.norm(G0), rel=1e-5)


def test_fltrust_keeps_the_global_model_when_nobody_is_trusted():
    g = tiny_state()
    replies = [train_reply(client_state(g, -s * G0), n) for n, s in ((1, 1.0), (2, 3.0))]
    strategy = prime(FLTrust(server_update_fn=server_fn_recording([])), g)
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = as_state(arrays)
    for k in g:
        np.testing.assert_array_equal(new[k], g[k])
    assert strategy.last_round_report["kept_global"] is True
    assert strategy.last_round_report["rejected"] == [1, 2]
    assert metrics is not None


def test_fltrust_validates_its_settings_and_the_server_update():
    with pytest.raises(DefenseConfigError):
        FLTrust(server_update_fn=None)
    with pytest.raises(DefenseConfigError, match="server_lr"):
        FLTrust(server_update_fn=lambda s, r: s, server_lr=0)
    g = tiny_state()
    strategy = prime(FLTrust(server_update_fn=lambda s, r: {"fc.bias": np.zeros(3)}), g)
    with pytest.raises(ValueError, match="lacks trainable keys"):
        strategy.aggregate_train(1, [train_reply(client_state(g, G0), 1)])
