"""``defense = "oracle"``: FedAvg over the benign replies by simulation ground truth (a reference)."""

import numpy as np

from defense_testkit import DIM, TRAINABLE, as_state, client_state, prime, tiny_state, train_reply
from flower_harness import error_reply
from server_app.defenses import update_math as um
from server_app.defenses.oracle import OracleFedAvg

BASE = np.full(DIM, 0.1)


def test_oracle_averages_exactly_the_benign_replies():
    g = tiny_state()
    strategy = prime(OracleFedAvg(), g)
    replies = [
        train_reply(client_state(g, BASE), 1, num_examples=10),
        train_reply(client_state(g, 3 * BASE), 2, num_examples=30),
        train_reply(client_state(g, -50 * BASE), 3, num_examples=100, malicious=True),
        error_reply(4),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    delta = um.flatten(as_state(arrays), TRAINABLE) - um.flatten(g, TRAINABLE)
    np.testing.assert_allclose(delta, (10 * BASE + 30 * 3 * BASE) / 40, atol=1e-6)  # the attacker never counts
    rep = strategy.last_round_report
    assert rep["accepted"] == [1, 2] and rep["rejected"] == [3]
    assert "ground truth" in rep["reasons"][3]


def test_oracle_keeps_the_model_when_every_reply_is_an_attacker():
    g = tiny_state()
    strategy = prime(OracleFedAvg(), g)
    assert strategy.aggregate_train(1, [train_reply(client_state(g, BASE), 1, malicious=True)]) == (None, None)
    assert strategy.last_round_report["rejected"] == [1]
