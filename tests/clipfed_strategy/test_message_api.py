"""``CLIPFed`` (Message API wrapper) in real in-process Flower rounds.

Part 1: a Non-IID digits federation (3 IID, 2 two-class, 1 BadNets client) trained inside a
ClientApp with a user-style ``nn.Sequential``, driven by ``Strategy.start`` over a FakeGrid: the
backdoored client is rejected, the benign ones kept, the aggregate is FedAvg of the kept replies
only; soft mode reweights, ``clip-norm=median`` clips.

Part 2 (issue 7): hostile replies, one test per kind, each rejected with its reason while the
round completes; a round where every reply is rejected keeps the previous model.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedMedian

from clipfed_strategy.core import ClientUpdate
from clipfed_strategy.message_api import CLIPFed
from clipfed_strategy.validation import update_norm
from flower_harness import FakeGrid, reply_message


def _helpers():
    """This directory's conftest.py as a module (its plain helper functions)."""
    from testkit import load_sibling

    return load_sibling(__file__, "conftest.py", "clipfed_strategy_tests_helpers")


H = _helpers()
digits_fl, make_defense, tiny_net = H.digits_fl, H.make_defense, H.tiny_net

BACKDOOR = 5  # partition id of the BadNets client in the digits federation


def clone(m: Message) -> Message:
    """An independent copy of a reply (the strategy may rewrite replies in place)."""
    if m.has_error():
        return Message(error=copy.deepcopy(m.error), metadata=copy.copy(m.metadata))
    return Message(content=copy.deepcopy(m.content), metadata=copy.copy(m.metadata))


class ReplyRecordingGrid(FakeGrid):
    """A FakeGrid that keeps pristine copies of the latest training replies."""

    train_replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.train_replies = [clone(m) for m in replies]
        return replies


def fedavg(n: int) -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)


def states_of(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def assert_same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    sa, sb = states_of(a), states_of(b)
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k


def assert_close_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    """Same keys, shapes and dtypes; values equal up to float summation order."""
    sa, sb = states_of(a), states_of(b)
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7, err_msg=k)


def in_dtypes_of(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` cast to ``reference``'s dtypes (Flower's FedAvg averages int64 BatchNorm
    counters into float64; CLIPFed hands back the global model's dtypes)."""
    ref = states_of(reference)
    return ArrayRecord({k: Array(np.asarray(np.rint(v) if ref[k].dtype.kind in "iu" else v).astype(ref[k].dtype))
                        for k, v in states_of(arrays).items()})


def layout(arrays) -> dict[str, tuple]:
    """Name -> (shape, dtype) of an ArrayRecord or a state dict."""
    items = arrays.items()
    return {k: (tuple(np.asarray(v.numpy() if hasattr(v, "numpy") else v).shape),
                str(np.asarray(v.numpy() if hasattr(v, "numpy") else v).dtype)) for k, v in items}


def weighted_float_average(states: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {k: sum(w * s[k].astype(np.float64) for s, w in zip(states, weights)) / total
            for k, v in states[0].items() if v.dtype.kind == "f"}


def configured(strategy: CLIPFed, global_arrays: ArrayRecord, num_nodes: int) -> CLIPFed:
    """Run ``configure_train`` (records w_t) without sending anything, as Strategy.start would."""
    with FakeGrid(lambda m, c: None, num_nodes) as grid:
        list(strategy.configure_train(1, global_arrays, ConfigRecord({}), grid))
    return strategy


# =========================================================================== Part 1: digits round


def digits_client_app(fed) -> ClientApp:
    """The user's ClientApp: load the global weights into a plain nn.Sequential, train, reply."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        model = fed.train_client(pid, msg.content["arrays"].to_torch_state_dict())
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(fed.partitions[pid]), "train-loss": 0.1}),
            "ground-truth": ConfigRecord({"malicious": fed.roles[pid] == "backdoor", "partition-id": pid}),
        })
        return Message(content=content, reply_to=msg)

    return app


@pytest.fixture(scope="module")
def digits_round(digits_federation):
    """One full Flower round of CLIPFed(FedAvg) (distillation off, so the aggregate is comparable)."""
    fed = digits_federation
    P = digits_fl()
    defense = make_defense(P.make_cnn(), fed.server_set, distill_enabled=False)
    strategy = CLIPFed(fedavg(6), defense)
    initial = ArrayRecord(fed.global_state)
    with ReplyRecordingGrid(digits_client_app(fed), num_nodes=6) as grid:
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    return {"fed": fed, "grid": grid, "strategy": strategy, "result": result, "initial": initial,
            "replies": grid.train_replies, "report": strategy.last_round_report}


def test_round_completes_and_rejects_exactly_the_backdoor(digits_round):
    grid, report = digits_round["grid"], digits_round["report"]
    backdoor = grid.node_ids[BACKDOOR]
    assert sorted(grid.partition_of[m.metadata.src_node_id] for m in digits_round["replies"]) == list(range(6))
    assert report["rejected"] == [backdoor]
    assert sorted(report["accepted"]) == sorted(grid.node_ids[:BACKDOOR])  # IID and two-class clients kept
    assert report["reasons"][backdoor].startswith("screening: flagged")
    assert "onto class 0" in report["reasons"][backdoor]  # the BadNets target
    assert set(report["scores"]) == set(grid.node_ids)
    assert report["scores"][backdoor] > max(report["scores"][n] for n in grid.node_ids[:BACKDOOR])
    # raw per-client metrics are reported too: the backdoored client collapses onto class 0
    details = report["screening"]
    assert set(details) == set(grid.node_ids)
    assert details[backdoor]["target"] == 0
    assert details[backdoor]["collapse"] > max(details[n]["collapse"] for n in grid.node_ids[:BACKDOOR])
    assert report["kept_previous_model"] is False and report["screen_enforced"] is True
    assert "STAND-IN" in report["teacher"]
    assert set(report["seconds"]) == {"validate", "screen", "aggregate", "distill"}
    metrics = digits_round["result"].train_metrics_clientapp[1]
    assert metrics["clipfed-accepted"] == 5 and metrics["clipfed-rejected"] == 1


def test_aggregate_is_fedavg_of_kept_replies_only(digits_round):
    grid, replies = digits_round["grid"], digits_round["replies"]
    kept = [clone(m) for m in replies if grid.partition_of[m.metadata.src_node_id] != BACKDOOR]
    expected, _ = fedavg(5).aggregate_train(1, kept)
    expected = in_dtypes_of(expected, digits_round["initial"])
    got = digits_round["result"].arrays
    assert_same_arrays(got, expected)
    assert layout(got) == layout(digits_round["initial"])
    # the same thing by hand, for the float entries
    n = [len(digits_round["fed"].partitions[grid.partition_of[m.metadata.src_node_id]]) for m in kept]
    by_hand = weighted_float_average([states_of(m.content["arrays"]) for m in kept], n)
    for k, v in by_hand.items():
        np.testing.assert_allclose(states_of(got)[k], v, rtol=1e-5, atol=1e-6)
    # ... and it is not what plain FedAvg over all six replies gives
    everyone, _ = fedavg(6).aggregate_train(1, [clone(m) for m in replies])
    assert not np.array_equal(states_of(everyone)["9.weight"], states_of(got)["9.weight"])


def test_rejection_removes_the_backdoor_from_the_global_model(digits_round):
    P = digits_fl()
    fed, replies = digits_round["fed"], digits_round["replies"]

    def asr(arrays):
        model = P.make_cnn()
        model.load_state_dict(arrays.to_torch_state_dict())
        return P.attack_success(model, fed.x_test, fed.y_test), P.accuracy(model, fed.x_test, fed.y_test)

    defended_asr, defended_acc = asr(digits_round["result"].arrays)
    plain_asr, _ = asr(fedavg(6).aggregate_train(1, [clone(m) for m in replies])[0])
    assert defended_asr < 0.1 and defended_acc > 0.8, (defended_asr, defended_acc)
    assert plain_asr > defended_asr, (plain_asr, defended_asr)


def test_soft_mode_reweights_instead_of_dropping(digits_round):
    fed, grid, replies = digits_round["fed"], digits_round["grid"], digits_round["replies"]
    P = digits_fl()
    strategy = configured(CLIPFed(fedavg(6), make_defense(P.make_cnn(), fed.server_set, distill_enabled=False,
                                                          screen={"mode": "soft"})),
                          digits_round["initial"], 6)
    arrays, metrics = strategy.aggregate_train(1, [clone(m) for m in replies])
    report = strategy.last_round_report
    backdoor = grid.node_ids[BACKDOOR]
    assert report["rejected"] == [] and len(report["accepted"]) == 6
    weights = report["weights"]
    n = {grid.node_ids[i]: len(fed.partitions[i]) for i in range(6)}
    for node in grid.node_ids[:BACKDOOR]:
        assert weights[node] == pytest.approx(n[node])  # benign clients keep their full weight
    assert 0 < weights[backdoor] < 0.05 * n[backdoor]
    expected = weighted_float_average([states_of(m.content["arrays"]) for m in replies],
                                      [weights[m.metadata.src_node_id] for m in replies])
    for k, v in expected.items():
        np.testing.assert_allclose(states_of(arrays)[k], v, rtol=1e-5, atol=1e-6)
    assert metrics["clipfed-accepted"] == 6 and metrics["clipfed-rejected"] == 0


def test_purify_readmits_the_flagged_client_without_its_backdoor(digits_round):
    """``screen-purify``: the flagged BadNets client is distilled towards the kept clients and aggregated
    at full weight (no post-aggregation distillation here), and the aggregate carries no backdoor."""
    fed, grid, replies = digits_round["fed"], digits_round["grid"], digits_round["replies"]
    P = digits_fl()
    strategy = configured(CLIPFed(fedavg(6), make_defense(P.make_cnn(), fed.server_set, distill_enabled=False,
                                                          screen={"purify": True})),
                          digits_round["initial"], 6)
    arrays, metrics = strategy.aggregate_train(1, [clone(m) for m in replies])
    report = strategy.last_round_report
    backdoor = grid.node_ids[BACKDOOR]
    assert report["purified"] == [backdoor] and report["rejected"] == [] and len(report["accepted"]) == 6
    assert report["weights"][backdoor] == pytest.approx(len(fed.partitions[BACKDOOR]))

    def asr_acc(arr):
        model = P.make_cnn()
        model.load_state_dict(arr.to_torch_state_dict())
        return P.attack_success(model, fed.x_test, fed.y_test), P.accuracy(model, fed.x_test, fed.y_test)

    agg_asr, agg_acc = asr_acc(arrays)
    assert agg_asr < 0.1 and agg_acc > 0.8, (agg_asr, agg_acc)
    # the readmitted model itself: the screening step's purified state against the client's own
    reply = next(m for m in replies if m.metadata.src_node_id == backdoor)
    raw_asr, raw_acc = asr_acc(reply.content["arrays"])
    updates = [ClientUpdate(str(m.metadata.src_node_id), states_of(m.content["arrays"]),
                            float(m.content["metrics"]["num-examples"])) for m in replies]
    out = strategy.defense.screen(1, states_of(digits_round["initial"]), updates)
    i = [u.client_id for u in updates].index(str(backdoor))
    assert out.purified == [j == i for j in range(6)]
    cleaned = P.make_cnn()
    cleaned.load_state_dict({k: torch.from_numpy(v) for k, v in out.states[i].items()})
    asr, acc = P.attack_success(cleaned, fed.x_test, fed.y_test), P.accuracy(cleaned, fed.x_test, fed.y_test)
    assert raw_asr > 0.8, raw_asr
    # measured: ASR 1.00 -> 0.01, accuracy 0.81 -> 0.90
    assert asr < raw_asr / 4 and acc > raw_acc - 0.05, (raw_asr, asr, raw_acc, acc)


def test_median_norm_clipping_clips_kept_updates(digits_round):
    fed, grid, replies = digits_round["fed"], digits_round["grid"], digits_round["replies"]
    P = digits_fl()
    strategy = configured(CLIPFed(fedavg(6), make_defense(P.make_cnn(), fed.server_set, distill_enabled=False,
                                                          screen={"clip_norm": "median"})),
                          digits_round["initial"], 6)
    arrays, _ = strategy.aggregate_train(1, [clone(m) for m in replies])
    report = strategy.last_round_report
    assert report["rejected"] == [grid.node_ids[BACKDOOR]]
    g = states_of(digits_round["initial"])
    kept = [m for m in replies if m.metadata.src_node_id != grid.node_ids[BACKDOOR]]
    norms = [update_norm(states_of(m.content["arrays"]), g) for m in kept]
    median = float(np.median(norms))
    assert report["clip_norm"] == pytest.approx(median)
    assert sum(nrm > median * (1 + 1e-6) for nrm in norms) >= 2  # something really gets clipped
    clipped = []
    for m, nrm in zip(kept, norms):
        s, scale = states_of(m.content["arrays"]), min(1.0, median / nrm)
        clipped.append({k: g[k] + (v - g[k]) * scale if v.dtype.kind == "f" and "running_" not in k else v
                        for k, v in s.items()})
        assert update_norm(clipped[-1], g) <= median * (1 + 1e-5)
    expected = weighted_float_average(clipped, [len(fed.partitions[grid.partition_of[m.metadata.src_node_id]])
                                                for m in kept])
    got = states_of(arrays)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6)
    # clipped replies keep every entry's shape and dtype (0-d BatchNorm counters included), so the
    # next round's replies still validate against this model
    assert layout(arrays) == layout(digits_round["initial"])
    assert layout(arrays)["1.num_batches_tracked"] == ((), "int64")
    unclipped = states_of(digits_round["result"].arrays)
    assert not np.allclose(unclipped["0.weight"], got["0.weight"])


def test_wraps_other_inner_strategies(digits_round):
    """The one-line swap works around FedMedian too: the median of the kept replies only."""
    fed, grid, replies = digits_round["fed"], digits_round["grid"], digits_round["replies"]
    P = digits_fl()
    inner = FedMedian(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=6, min_available_nodes=6)
    strategy = configured(CLIPFed(inner, make_defense(P.make_cnn(), fed.server_set, distill_enabled=False)),
                          digits_round["initial"], 6)
    arrays, _ = strategy.aggregate_train(1, [clone(m) for m in replies])
    kept = [clone(m) for m in replies if m.metadata.src_node_id != grid.node_ids[BACKDOOR]]
    expected, _ = FedMedian(min_train_nodes=5, min_available_nodes=5).aggregate_train(1, kept)
    assert_same_arrays(arrays, in_dtypes_of(expected, digits_round["initial"]))


# =========================================================================== Part 2: hostile replies

NODES = 5  # partition 0 is hostile, 1..4 benign
GLOBAL = {k: v.clone() for k, v in tiny_net(0).state_dict().items()}


def benign_content(pid: int) -> RecordDict:
    """What an honest client sends: the global model plus a small seeded update."""
    g = torch.Generator().manual_seed(100 + pid)
    state = {}
    for k, v in GLOBAL.items():
        if v.dtype.is_floating_point and "running_" not in k:
            state[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            state[k] = v + 5
        else:
            state[k] = v.clone()
    return RecordDict({"arrays": ArrayRecord(state),
                       "metrics": MetricRecord({"num-examples": 40 + 10 * pid, "train-loss": 0.5})})


def _set(content: RecordDict, key: str, value: np.ndarray) -> RecordDict:
    arrays = {k: a.numpy() for k, a in content["arrays"].items()}
    arrays[key] = value
    content["arrays"] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
    return content


def _edit(content: RecordDict, key: str, fn) -> RecordDict:
    return _set(content, key, fn(content["arrays"][key].numpy().copy()))


def _put(arr, idx, value):
    arr.flat[idx] = value
    return arr


def _num_examples(value):
    def mutate(content):
        if value is None:
            del content["metrics"]["num-examples"]
        else:
            content["metrics"]["num-examples"] = value
        return content
    return mutate


def _without(record):
    def mutate(content):
        return RecordDict({k: v for k, v in content.items() if k != record})
    return mutate


def _add_record(name, record):
    def mutate(content):
        content[name] = record
        return content
    return mutate


def _drop_array(key):
    def mutate(content):
        arrays = {k: a for k, a in content["arrays"].items() if k != key}
        content["arrays"] = ArrayRecord(arrays)
        return content
    return mutate


def _undecodable(content):
    ref = content["arrays"]["fc1.weight"]
    arrays = dict(content["arrays"].items())
    arrays["fc1.weight"] = Array(dtype=ref.dtype, shape=tuple(ref.shape), stype=ref.stype, data=b"\x93NUMPY garbage")
    content["arrays"] = ArrayRecord(arrays)
    return content


def _boosted(factor):
    def mutate(content):
        g = {k: v.numpy() for k, v in GLOBAL.items()}
        for k in ("conv.weight", "fc1.weight", "fc2.weight"):
            content = _edit(content, k, lambda a, k=k: (g[k] + factor * (a - g[k])).astype(np.float32))
        return content
    return mutate


HOSTILE = {
    "nan": (lambda c: _edit(c, "fc1.weight", lambda a: _put(a, 3, np.nan)), r"'fc1.weight' contains NaN or Inf"),
    "inf": (lambda c: _edit(c, "fc2.bias", lambda a: _put(a, 0, -np.inf)), r"'fc2.bias' contains NaN or Inf"),
    "huge-value": (lambda c: _edit(c, "conv.bias", lambda a: _put(a, 1, 1e9)), r"'conv.bias' has \|value\| > 1e\+06"),
    "wrong-shape": (lambda c: _set(c, "fc2.bias", np.zeros(11, np.float32)), r"'fc2.bias' has shape \(11,\), expected \(10,\)"),
    "wrong-rank": (lambda c: _edit(c, "fc1.weight", lambda a: a.reshape(-1)), r"'fc1.weight' has shape \(1024,\)"),
    "wrong-dtype": (lambda c: _edit(c, "fc1.weight", lambda a: a.astype(np.float64)), r"'fc1.weight' has dtype float64, expected float32"),
    "int-dtype-buffer": (lambda c: _edit(c, "bn.num_batches_tracked", lambda a: a.astype(np.float32)), r"'bn.num_batches_tracked' has dtype float32, expected int64"),
    "missing-key": (_drop_array("fc2.bias"), r"missing parameters \['fc2.bias'\]"),
    "extra-key": (lambda c: _set(c, "trojan.weight", np.ones(3, np.float32)), r"unexpected parameters \['trojan.weight'\]"),
    "two-arrayrecords": (_add_record("shadow", ArrayRecord({"x": Array(np.ones(2, np.float32))})),
                         r"expected exactly one ArrayRecord 'arrays', got \['arrays', 'shadow'\]"),
    "renamed-arrayrecord": (lambda c: RecordDict({"weights": c["arrays"], "metrics": c["metrics"]}),
                            r"expected exactly one ArrayRecord 'arrays', got \['weights'\]"),
    "missing-metricrecord": (_without("metrics"), r"expected exactly one MetricRecord 'metrics', got \[\]"),
    "two-metricrecords": (_add_record("more", MetricRecord({"x": 1.0})),
                          r"expected exactly one MetricRecord 'metrics'"),
    "num-examples-zero": (_num_examples(0), r"num-examples must be a positive integer, got 0"),
    "num-examples-negative": (_num_examples(-7), r"num-examples must be a positive integer, got -7"),
    "num-examples-fraction": (_num_examples(2.5), r"num-examples must be a positive integer, got 2.5"),
    "num-examples-nan": (_num_examples(float("nan")), r"num-examples must be a positive integer, got nan"),
    "num-examples-absurd": (_num_examples(10**12), r"num-examples 1000000000000 is absurd"),
    "num-examples-missing": (_num_examples(None), r"num-examples missing or not a number \(NoneType\)"),
    "num-examples-list": (_num_examples([10, 20]), r"num-examples missing or not a number \(list\)"),
    "absurd-update-norm": (_boosted(1e6), r"update norm .* is absurd \(> 50 × median"),
    # finite, small and outside the update norm, yet averaged in it makes every output NaN
    "negative-running-var": (lambda c: _edit(c, "bn.running_var", lambda a: np.full_like(a, -50.0)),
                             r"'bn.running_var' has negative variances"),
    "undecodable-bytes": (_undecodable, r"undecodable arrays \(\w+"),
}


def hostile_app(kind: str | None, hostile_pids=(0,)):
    def app(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid in hostile_pids and kind == "client-error":
            raise RuntimeError("local training diverged")
        content = benign_content(pid)
        if pid in hostile_pids and kind is not None:
            content = HOSTILE[kind][0](content)
        return Message(content=content, reply_to=msg)
    return app


@pytest.fixture(scope="module")
def hostile_env(small_server_set):
    def run(kind, *, distill=False, hostile_pids=(0,), num_rounds=1):
        defense = make_defense(tiny_net(1), small_server_set, distill_enabled=distill,
                               distill={"steps": 2, "batch_size": 64})
        strategy = CLIPFed(fedavg(NODES), defense)
        initial = ArrayRecord(GLOBAL)
        with FakeGrid(hostile_app(kind, hostile_pids), NODES) as grid:
            result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds)
        return strategy, grid, result

    _, grid, _ = run(None)
    benign = [Message(content=benign_content(p), metadata=_meta(grid, p)) for p in range(1, NODES)]
    expected, _ = fedavg(NODES - 1).aggregate_train(1, benign)
    return run, in_dtypes_of(expected, ArrayRecord(GLOBAL))


def _meta(grid, pid):
    return reply_message(RecordDict(), grid.node_ids[pid]).metadata


def test_all_benign_replies_are_accepted(hostile_env):
    run, _ = hostile_env
    strategy, grid, result = run(None, distill=True)
    report = strategy.last_round_report
    assert report["rejected"] == [] and sorted(report["accepted"]) == sorted(grid.node_ids)
    assert report["metrics_dropped"] == []
    assert result.train_metrics_clientapp[1]["train-loss"] == pytest.approx(0.5)
    assert report["distill"]["steps"] == 2  # distillation ran on the aggregate
    assert all(np.all(np.isfinite(v)) for v in states_of(result.arrays).values())


def test_next_round_replies_still_validate_without_distillation(hostile_env):
    """Round 2 checks replies against round 1's aggregate: it must keep the model's dtypes
    (int64 BatchNorm counter) even when no distillation step rebuilds the state dict."""
    run, _ = hostile_env
    strategy, grid, result = run(None, distill=False, num_rounds=2)
    assert strategy.last_round_report["rejected"] == [], strategy.last_round_report["reasons"]
    assert layout(result.arrays) == layout(ArrayRecord(GLOBAL))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_reply_is_rejected_with_its_reason(hostile_env, kind):
    run, expected = hostile_env
    strategy, grid, result = run(kind)
    report = strategy.last_round_report
    hostile = grid.node_ids[0]
    assert report["rejected"] == [hostile]
    assert sorted(report["accepted"]) == sorted(grid.node_ids[1:])
    assert re.search(HOSTILE[kind][1], report["reasons"][hostile]), report["reasons"][hostile]
    # the round completed with a finite model that the hostile reply did not touch
    assert all(np.all(np.isfinite(v)) for v in states_of(result.arrays).values() if v.dtype.kind == "f")
    assert_close_arrays(result.arrays, expected)
    assert result.train_metrics_clientapp[1]["clipfed-rejected"] == 1


ODD_METRICS = {
    "extra-metric": (lambda r: r.__setitem__("evil", 1.0), ["evil"]),
    "missing-metric": (lambda r: r.__delitem__("train-loss"), ["train-loss"]),
    "list-metric": (lambda r: r.__setitem__("train-loss", [0.1, 0.2]), ["train-loss"]),
}


@pytest.mark.parametrize("kind", sorted(ODD_METRICS))
def test_odd_client_metrics_do_not_abort_the_round(hostile_env, kind, monkeypatch):
    """Flower's FedAvg raises when MetricRecord keys differ between replies; one client must not be
    able to stop the round that way. Its model is fine, so it is kept; the odd metric is left out."""
    mutate, dropped = ODD_METRICS[kind]

    def odd(content):
        mutate(content["metrics"])
        return content

    monkeypatch.setitem(HOSTILE, kind, (odd, ""))
    run, _ = hostile_env
    strategy, grid, result = run(kind)
    report = strategy.last_round_report
    assert report["rejected"] == [] and len(report["accepted"]) == NODES
    assert report["metrics_dropped"] == dropped
    metrics = result.train_metrics_clientapp[1]
    assert metrics["clipfed-accepted"] == NODES and all(k not in metrics for k in dropped)
    assert len(result.arrays) == len(GLOBAL)


def test_client_error_reply_is_rejected_and_round_goes_on(hostile_env):
    run, expected = hostile_env
    strategy, grid, result = run("client-error", hostile_pids=(0, 2))
    report = strategy.last_round_report
    assert report["rejected"] == sorted([grid.node_ids[0], grid.node_ids[2]])
    assert report["reasons"][grid.node_ids[0]] == "client error: RuntimeError: local training diverged"
    assert sorted(report["accepted"]) == sorted([grid.node_ids[i] for i in (1, 3, 4)])
    assert all(np.all(np.isfinite(v)) for v in states_of(result.arrays).values() if v.dtype.kind == "f")


def test_hostile_replies_with_distillation_keep_the_model_finite(hostile_env):
    run, _ = hostile_env
    strategy, grid, result = run("nan", distill=True, num_rounds=2)
    report = strategy.last_round_report
    assert report["rejected"] == [grid.node_ids[0]] and report["distill"]["steps"] == 2
    assert all(np.all(np.isfinite(v)) for v in states_of(result.arrays).values() if v.dtype.kind == "f")


def test_all_replies_rejected_keeps_the_previous_model(hostile_env, small_server_set):
    run, _ = hostile_env
    strategy, grid, result = run("nan", hostile_pids=tuple(range(NODES)), distill=True)
    report = strategy.last_round_report
    assert report["accepted"] == [] and report["rejected"] == sorted(grid.node_ids)
    assert report["kept_previous_model"] is True and report["distill"] == {}
    assert len(result.arrays) == 0  # Strategy.start never received new arrays
    # directly: aggregate_train answers (None, metrics)
    strategy = configured(CLIPFed(fedavg(NODES), make_defense(tiny_net(1), small_server_set)), ArrayRecord(GLOBAL), NODES)
    replies = [Message(content=HOSTILE["inf"][0](benign_content(p)), metadata=_meta(grid, p)) for p in range(NODES)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert metrics["clipfed-accepted"] == 0 and metrics["clipfed-rejected"] == NODES
    assert all("NaN or Inf" in r for r in strategy.last_round_report["reasons"].values())


def test_aggregate_train_before_configure_train_is_an_error(small_server_set):
    strategy = CLIPFed(fedavg(2), make_defense(tiny_net(1), small_server_set))
    with pytest.raises(RuntimeError, match="before configure_train"):
        strategy.aggregate_train(1, [])
