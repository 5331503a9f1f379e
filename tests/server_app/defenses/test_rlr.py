import numpy as np
import pytest

from defense_testkit import DIM, as_state, client_state, prime, tiny_state, train_reply, trainable_delta
from server_app.defenses import DefenseConfigError, RobustLR
from server_app.defenses.rlr import effective_threshold, robust_learning_rates

HEAD = np.array(
    [
        [1.0, 1.0, 1.0, -1.0, 1.0, 0.5],
        [2.0, 1.0, -1.0, -1.0, 1.0, 0.5],
        [1.0, -1.0, 1.0, -1.0, -1.0, 0.0],
        [3.0, -1.0, -1.0, -2.0, 1.0, 0.0],
    ]
)  # sign sums per coordinate: 4, 0, 0, -4, 2, 2
NUM_EXAMPLES = [10, 20, 30, 40]


def updates():
    u = np.full((4, DIM), 0.01)  # the other coordinates: unanimous
    u[:, :6] = HEAD
    return u


def run(strategy, bn=None):
    g = tiny_state()
    bn = bn or [None] * 4
    replies = [
        train_reply(client_state(g, u, b), n, num_examples=k)
        for n, u, k, b in zip((1, 2, 3, 4), updates(), NUM_EXAMPLES, bn)
    ]
    arrays, _ = prime(strategy, g).aggregate_train(1, replies)
    return g, as_state(arrays)


@pytest.mark.parametrize("threshold", [2, 0.5])  # 0.5 * K = 2
def test_rlr_flips_the_learning_rate_exactly_where_signs_disagree(threshold):
    strategy = RobustLR(threshold=threshold)
    g, new = run(strategy)
    delta = trainable_delta(new, g)
    # weighted means (weights 10..40): 2.0, -0.4, -0.2, -1.4, 0.4, 0.15; coords 1 and 2 flipped
    np.testing.assert_allclose(delta[:6], [2.0, 0.4, 0.2, -1.4, 0.4, 0.15], atol=1e-6)
    np.testing.assert_allclose(delta[6:], 0.01, atol=1e-6)
    rep = strategy.last_round_report
    assert rep["flipped_coordinates"] == 2 and rep["threshold"] == 2.0
    assert rep["accepted"] == [1, 2, 3, 4] and rep["rejected"] == []


def test_rlr_higher_threshold_flips_weak_majorities_too():
    g, new = run(RobustLR(threshold=3, server_lr=0.5))
    np.testing.assert_allclose(trainable_delta(new, g)[:6], 0.5 * np.array([2.0, 0.4, 0.2, -1.4, -0.4, -0.15]), atol=1e-6)


def test_rlr_unweighted_and_batchnorm_statistics_are_averaged_not_flipped():
    bn = [{"bn.running_mean": np.full(2, float(i))} for i in range(4)]
    g, new = run(RobustLR(weight_by_num_examples=False), bn)
    np.testing.assert_allclose(trainable_delta(new, g)[:6], [1.75, 0.0, 0.0, -1.25, 0.5, 0.25], atol=1e-6)
    np.testing.assert_allclose(new["bn.running_mean"], [1.5, 1.5])


def test_robust_learning_rates_pure_function():
    np.testing.assert_array_equal(robust_learning_rates(HEAD, 2.0, 1.0), [1, -1, -1, 1, 1, 1])
    assert effective_threshold(0.25, 8) == 2.0 and effective_threshold(4, 8) == 4.0
    with pytest.raises(DefenseConfigError, match="threshold"):
        RobustLR(threshold=0)
