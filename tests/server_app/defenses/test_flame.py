import logging

import numpy as np
import pytest

from defense_testkit import BN_STATS, DIM, TRAINABLE, as_state, client_state, prime, tiny_state, train_reply, trainable_delta
from server_app.defenses import DefenseConfigError, Flame
from server_app.defenses import flame as flame_mod
from server_app.defenses import update_math as um

BENIGN = [11, 12, 13, 14, 15]
OUTLIER = 99


def benign_updates(group_sizes=(3, 2), scales=(1.0, 1.5, 2.0, 2.5, 3.0, 3.5)) -> np.ndarray:
    """Benign updates: one shared direction, then two tight groups that differ slightly.

    FLAME's HDBSCAN (min_samples=1, allow_single_cluster) keeps the points still in the
    majority cluster when it breaks into pieces smaller than ``min_cluster_size``; two
    groups each smaller than that make the whole benign set survive to that break.
    """
    d = np.zeros(DIM)
    d[:10] = 0.1
    eye = np.eye(DIM)
    rows, i = [], 0
    for g, size in enumerate(group_sizes):
        for _ in range(size):
            rows.append(scales[i] * (d + 0.03 * eye[10 + g] + 0.003 * eye[12 + i]))
            i += 1
    return np.stack(rows)


def outlier_replies(g):
    ups = benign_updates()
    outlier = np.zeros(DIM)
    outlier[15:] = 5.0  # large, in other coordinates
    replies = [train_reply(client_state(g, u), n) for n, u in zip(BENIGN, ups)]
    replies.append(train_reply(client_state(g, outlier), OUTLIER, malicious=True))
    return ups, outlier, replies


def test_flame_drops_outlier_and_clips_to_median_norm(caplog):
    g = tiny_state()
    ups, outlier, replies = outlier_replies(g)
    strategy = prime(Flame(noise_lambda=0.0), g)
    with caplog.at_level(logging.INFO, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    rep = strategy.last_round_report
    assert rep["rejected"] == [OUTLIER] and rep["accepted"] == BENIGN
    assert rep["reasons"][OUTLIER] == "noise"
    assert rep["scores"][OUTLIER] > max(rep["scores"][n] for n in BENIGN)
    norms = np.linalg.norm(np.vstack([ups, outlier]), axis=1)
    median = float(np.median(norms))
    assert rep["median_norm"] == pytest.approx(median, rel=1e-5)
    # clients above the median norm are clipped to it, the others are untouched
    assert rep["clipped"] == [n for n, u in zip(BENIGN, ups) if np.linalg.norm(u) > median] != []
    factors = np.minimum(1.0, median / np.linalg.norm(ups, axis=1))
    expected = (ups * factors[:, None]).mean(axis=0)
    new = as_state(arrays)
    np.testing.assert_allclose(trainable_delta(new, g), expected, atol=2e-6)
    assert np.linalg.norm(trainable_delta(new, g)) <= median * (1 + 1e-5)
    assert metrics["train-loss"] == pytest.approx(0.5)
    assert any("FLAME round 1: kept 5/6" in r.getMessage() for r in caplog.records)


def test_flame_noise_is_seeded_scaled_and_only_on_trainable_parameters():
    g = tiny_state()
    ups = benign_updates((3, 3))
    bn = [{"bn.running_mean": np.full(2, float(i)), "bn.running_var": np.full(2, 1.0 + i)} for i in range(6)]
    replies = [train_reply(client_state(g, u, b), n) for n, u, b in zip(BENIGN + [16], ups, bn)]
    quiet = as_state(prime(Flame(noise_lambda=0.0), g).aggregate_train(1, replies)[0])
    noisy_strategy = prime(Flame(noise_lambda=0.5, seed=3), g)
    noisy = as_state(noisy_strategy.aggregate_train(1, replies)[0])
    again = as_state(prime(Flame(noise_lambda=0.5, seed=3), g).aggregate_train(1, replies)[0])
    other_round = as_state(prime(Flame(noise_lambda=0.5, seed=3), g).aggregate_train(2, replies)[0])
    noise = trainable_delta(noisy, quiet)
    sigma = noisy_strategy.last_round_report["noise_sigma"]
    assert sigma == pytest.approx(0.5 * np.median(np.linalg.norm(ups, axis=1)), rel=1e-5)
    assert 0.5 * sigma < noise.std() < 1.5 * sigma
    np.testing.assert_array_equal(trainable_delta(again, quiet), noise)
    assert not np.allclose(trainable_delta(other_round, quiet), noise)
    for k in BN_STATS:  # averaged over kept clients, never noised
        np.testing.assert_array_equal(noisy[k], quiet[k])
    assert len(noisy_strategy.last_round_report["accepted"]) == 6
    np.testing.assert_allclose(noisy["bn.running_mean"], [2.5, 2.5])
    assert noisy["bn.num_batches_tracked"].dtype == np.int64


def test_batchnorm_statistics_do_not_enter_the_clustering():
    g = tiny_state()
    ups = benign_updates((3, 3))
    nodes = BENIGN + [16]
    # one client's BN statistics are wildly different, its weights are benign
    bns = [None] * 5 + [{"bn.running_mean": np.array([1e4, -1e4]), "bn.running_var": np.array([1e6, 1e-6])}]
    replies = [train_reply(client_state(g, u, b), n) for n, u, b in zip(nodes, ups, bns)]
    strategy = prime(Flame(noise_lambda=0.0), g)
    strategy.aggregate_train(1, replies)
    assert strategy.last_round_report["rejected"] == []
    # the same round clustered on weights + BN statistics (the public-code bug) rejects that client
    buggy = prime(Flame(noise_lambda=0.0, trainable_keys=TRAINABLE + ["bn.running_mean", "bn.running_var"]), g)
    buggy.aggregate_train(1, replies)
    assert buggy.last_round_report["rejected"] == [16]


def test_flame_fails_open_when_everything_is_noise(monkeypatch, caplog):
    g = tiny_state()
    _, _, replies = outlier_replies(g)
    monkeypatch.setattr(flame_mod, "flame_clusters", lambda d, m: -np.ones(d.shape[0], dtype=int))
    strategy = prime(Flame(noise_lambda=0.0), g)
    with caplog.at_level(logging.INFO, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)
    rep = strategy.last_round_report
    assert rep["fail_open"] is True and rep["rejected"] == [] and len(rep["accepted"]) == 6
    assert rep["reasons"][OUTLIER].startswith("fail-open")
    assert any("FAIL-OPEN" in r.getMessage() for r in caplog.records)
    # clipping still bounds the outlier's influence
    assert np.linalg.norm(trainable_delta(as_state(arrays), g)) <= rep["median_norm"] * (1 + 1e-5)


def test_flame_settings_are_validated():
    with pytest.raises(DefenseConfigError, match="noise_lambda"):
        Flame(noise_lambda=-1)
    with pytest.raises(DefenseConfigError, match="min_cluster_size"):
        Flame(min_cluster_size=1)


def test_majority_mask_picks_largest_cluster():
    np.testing.assert_array_equal(flame_mod.majority_mask(np.array([1, 0, 0, -1, 1, 0])), [0, 1, 1, 0, 0, 1])
    assert not flame_mod.majority_mask(np.array([-1, -1])).any()
    assert um.cosine_distance_matrix(benign_updates()).max() < 0.02  # the benign set is tight
