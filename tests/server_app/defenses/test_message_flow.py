"""Each defence inside Flower's own round loop (``Strategy.start``) on the in-process FakeGrid."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from defense_testkit import DIM, TRAINABLE, as_state, client_state, prime, tiny_state, train_reply
from flower_harness import FakeGrid, error_reply
from server_app.defenses import FLTrust, Flame, FoolsGold, RobustLR
from server_app.defenses import update_math as um

BASE = np.full(DIM, 0.1)
ATTACKERS = (4, 5)  # partition ids sending one identical opposite update
FAILS_IN_ROUND_2 = 3


def server_update_fn(global_state, server_round):
    return um.unflatten(BASE, global_state, TRAINABLE)


def make(name):
    kw = {"fraction_evaluate": 0.5, "min_available_nodes": 6, "min_train_nodes": 6}
    return {
        "flame": lambda: Flame(**kw),
        "fltrust": lambda: FLTrust(server_update_fn=server_update_fn, **kw),
        "foolsgold": lambda: FoolsGold(**kw),
        "rlr": lambda: RobustLR(threshold=3, **kw),
    }[name]()


def client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        if pid == FAILS_IN_ROUND_2 and rnd == 2:
            raise RuntimeError("simulated client crash")
        state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        if pid in ATTACKERS:
            update = -3.0 * BASE
        else:
            update = BASE + 0.05 * np.random.default_rng([pid, rnd]).normal(size=DIM)
        new = client_state(state, update, {"bn.running_mean": np.full(2, float(pid))})
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(np.array(v, order="C")) for k, v in new.items()}),
                    "metrics": MetricRecord({"num-examples": 10 + pid, "train-loss": 1.0 / rnd}),
                    "ground-truth": ConfigRecord({"malicious": pid in ATTACKERS, "partition-id": pid}),
                }
            ),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "acc": pid / 10})}), reply_to=msg)

    return app


@pytest.mark.parametrize("name", ["flame", "fltrust", "foolsgold", "rlr"])
def test_two_round_run_through_strategy_start(name):
    strategy = make(name)
    initial = tiny_state()
    seen = {}

    def evaluate_fn(server_round, arrays):
        seen[server_round] = as_state(arrays)
        return MetricRecord({"round": server_round})

    with FakeGrid(client_app(), num_nodes=6) as grid:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
            num_rounds=2,
            evaluate_fn=evaluate_fn,
        )
        attackers = {n for n, p in grid.partition_of.items() if p in ATTACKERS}
        failing = next(n for n, p in grid.partition_of.items() if p == FAILS_IN_ROUND_2)
        train_batches = [b for b in grid.sent if b and b[0].metadata.message_type == "train"]

    assert len(train_batches) == 2 and all(len(b) == 6 for b in train_batches)
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]  # 3 of 6 nodes evaluated each round
    assert 0.0 <= result.evaluate_metrics_clientapp[1]["acc"] <= 0.5
    # round 2 was configured with round 1's aggregate (w_t tracking)
    sent_round2 = as_state(train_batches[1][0].content["arrays"])
    for k in initial:
        np.testing.assert_array_equal(sent_round2[k], seen[1][k])
        assert seen[2][k].dtype == initial[k].dtype and seen[2][k].shape == initial[k].shape
    assert not np.allclose(seen[2]["fc.weight"], initial["fc.weight"])
    assert sorted(result.train_metrics_clientapp) == [1, 2]

    rep = strategy.last_round_report  # round 2: the crashed client is absent
    assert sorted(rep["accepted"] + rep["rejected"]) == sorted(set(grid.node_ids) - {failing})
    assert set(rep["scores"]) == set(rep["reasons"]) == set(rep["accepted"]) | set(rep["rejected"])
    assert rep["seconds"] >= 0
    if name == "rlr":
        assert rep["rejected"] == []
    else:  # the detection defences drop the two identical opposite updates
        assert set(rep["rejected"]) >= attackers
        assert not attackers & set(rep["accepted"])


@pytest.mark.parametrize("name", ["flame", "fltrust", "foolsgold", "rlr"])
def test_every_defence_survives_an_all_error_round(name):
    strategy = make(name)
    assert strategy.aggregate_train(1, [error_reply(1), error_reply(2, reason="timeout")]) == (None, None)
    assert strategy.last_round_report["accepted"] == [] and strategy.last_round_report["rejected"] == []
    assert strategy.aggregate_train(2, []) == (None, None)


def test_error_replies_are_dropped_before_the_defence():
    g = tiny_state()
    strategy = prime(RobustLR(), g)
    replies = [train_reply(client_state(g, BASE), 1), error_reply(2), train_reply(client_state(g, BASE), 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_round_report["accepted"] == [1, 3]
    np.testing.assert_allclose(um.flatten(as_state(arrays), TRAINABLE) - um.flatten(g, TRAINABLE), BASE, atol=1e-6)
