"""``CLIPFedLegacy`` around ``flwr.server.strategy.FedAvg`` (the legacy ``aggregate_fit`` API).

The adapter is driven directly with ``ClientProxy`` stand-ins and ``FitRes`` objects, and once
through Flower's own legacy machinery (``ServerApp(server_fn=...)`` + a ``NumPyClient``) on an
in-process grid.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedMedian

from clipfed_strategy.core import ScreeningOutcome
from clipfed_strategy.legacy_api import CLIPFedLegacy
from flower_harness import FakeGrid


def _helpers():
    """This directory's conftest.py as a module (its plain helper functions)."""
    from testkit import load_sibling

    return load_sibling(__file__, "conftest.py", "clipfed_strategy_tests_helpers")


H = _helpers()
GLOBAL_STATE = {k: v.clone() for k, v in H.tiny_net(0).state_dict().items()}
NAMES = list(GLOBAL_STATE)
GLOBAL = [v.numpy() for v in GLOBAL_STATE.values()]  # what `[v.numpy() for v in net.state_dict().values()]` sends


class StandInProxy(ClientProxy):
    """A ClientProxy that is never called: the tests hand ``aggregate_fit`` its results directly."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def benign_arrays(i: int) -> list[np.ndarray]:
    g = np.random.default_rng(200 + i)
    out = []
    for name, v in zip(NAMES, GLOBAL):
        if v.dtype.kind == "f" and "running_" not in name:
            out.append((v + 0.01 * g.standard_normal(v.shape)).astype(v.dtype))
        elif name.endswith("num_batches_tracked"):
            out.append(v + 3)
        else:
            out.append(v.copy())
    return out


def fit_res(arrays: list[np.ndarray] | Parameters, n: int) -> FitRes:
    params = arrays if isinstance(arrays, Parameters) else ndarrays_to_parameters(arrays)
    return FitRes(Status(Code.OK, ""), params, n, {"train-loss": 0.5})


def inner(k: int) -> FedAvg:
    return FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=k, min_available_clients=k)


def configured(strategy: CLIPFedLegacy, k: int) -> tuple[CLIPFedLegacy, list[ClientProxy]]:
    manager = SimpleClientManager()
    for i in range(k):
        manager.register(StandInProxy(f"c{i}"))
    pairs = strategy.configure_fit(1, ndarrays_to_parameters(GLOBAL), manager)
    assert len(pairs) == k and all(ins.parameters.tensors == ndarrays_to_parameters(GLOBAL).tensors
                                   for _, ins in pairs)
    return strategy, sorted((p for p, _ in pairs), key=lambda p: p.cid)


def legacy(small_server_set, k: int, **kwargs) -> tuple[CLIPFedLegacy, list[ClientProxy]]:
    return configured(CLIPFedLegacy(inner(k), H.make_defense(H.tiny_net(0), small_server_set, **kwargs)), k)


def as_global_dtypes(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(np.rint(a) if g.dtype.kind in "iu" else a).astype(g.dtype) for a, g in zip(arrays, GLOBAL)]


def mixed_results(proxies):
    """c0: too few arrays, c1: NaN, c2..c5: benign."""
    results = []
    for i, p in enumerate(proxies):
        arrays = benign_arrays(i)
        if i == 0:
            arrays = arrays[:3]
        if i == 1:
            arrays[NAMES.index("fc1.weight")].flat[0] = np.nan
        results.append((p, fit_res(arrays, 40 + 10 * i)))
    return results


def test_malformed_results_rejected_and_aggregate_is_fedavg_of_kept(small_server_set):
    strategy, proxies = legacy(small_server_set, 6, distill_enabled=False)
    results = mixed_results(proxies)
    params, metrics = strategy.aggregate_fit(1, copy.deepcopy(results), [])
    report = strategy.last_round_report
    assert report["rejected"] == ["c0", "c1"]
    assert report["reasons"]["c0"] == f"got 3 arrays, expected {len(NAMES)}"
    assert report["reasons"]["c1"] == "parameter 'fc1.weight' contains NaN or Inf"
    assert report["accepted"] == ["c2", "c3", "c4", "c5"]
    assert metrics["clipfed-accepted"] == 4 and metrics["clipfed-rejected"] == 2
    expected, _ = inner(4).aggregate_fit(1, copy.deepcopy(results[2:]), [])
    got = parameters_to_ndarrays(params)
    for name, a, b in zip(NAMES, got, as_global_dtypes(parameters_to_ndarrays(expected))):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    # by hand, for a float entry
    k = NAMES.index("fc2.weight")
    n = np.array([40 + 10 * i for i in range(2, 6)], dtype=np.float64)
    by_hand = sum(w * benign_arrays(i)[k] for w, i in zip(n, range(2, 6))) / n.sum()
    np.testing.assert_allclose(got[k], by_hand, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("inplace", [True, False])
def test_aggregate_keeps_the_global_dtypes_for_the_next_round(small_server_set, inplace):
    """FedAvg(inplace=False) turns the int64 BatchNorm counter into float64; the adapter must hand
    back the model's own dtypes, or every reply of the next round would fail validation."""
    fedavg = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=4, min_available_clients=4,
                    inplace=inplace)
    defense = H.make_defense(H.tiny_net(0), small_server_set, distill_enabled=False)
    strategy, proxies = configured(CLIPFedLegacy(fedavg, defense), 4)
    params, _ = strategy.aggregate_fit(1, [(p, fit_res(benign_arrays(i), 50)) for i, p in enumerate(proxies)], [])
    got = parameters_to_ndarrays(params)
    assert [(a.shape, a.dtype) for a in got] == [(g.shape, g.dtype) for g in GLOBAL]
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    strategy.configure_fit(2, params, manager)
    params2, _ = strategy.aggregate_fit(2, [(p, fit_res(benign_arrays(10 + i), 50)) for i, p in enumerate(proxies)], [])
    assert strategy.last_round_report["rejected"] == [] and params2 is not None


def test_with_distillation_result_is_fedavg_of_kept_then_distilled(small_server_set):
    distill = {"steps": 3, "batch_size": 32}
    strategy, proxies = legacy(small_server_set, 6, distill=distill)
    results = mixed_results(proxies)
    params, metrics = strategy.aggregate_fit(1, copy.deepcopy(results), [])
    assert strategy.last_round_report["accepted"] == ["c2", "c3", "c4", "c5"]
    assert strategy.last_round_report["distill"]["steps"] == 3
    # the same steps by hand: FedAvg over the kept results, then the core's distil on a fresh twin
    fedavg, _ = inner(4).aggregate_fit(1, copy.deepcopy(results[2:]), [])
    twin = H.make_defense(H.tiny_net(0), small_server_set, distill=distill)
    state = {k: torch.from_numpy(np.array(v)) for k, v in zip(NAMES, parameters_to_ndarrays(fedavg))}
    distilled, stats = twin.distill(1, state)
    got = parameters_to_ndarrays(params)
    for name, a in zip(NAMES, got):
        b = distilled[name].numpy()
        assert a.dtype == GLOBAL[NAMES.index(name)].dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)
    assert not np.allclose(got[NAMES.index("fc2.weight")], parameters_to_ndarrays(fedavg)[NAMES.index("fc2.weight")])
    assert stats["steps"] == 3


def test_undecodable_parameters_are_rejected(small_server_set):
    strategy, proxies = legacy(small_server_set, 4, distill_enabled=False)
    results = [(p, fit_res(benign_arrays(i), 50)) for i, p in enumerate(proxies)]
    good = parameters_to_ndarrays(results[0][1].parameters)
    results[0] = (proxies[0], fit_res(Parameters(tensors=[b"not an npy file"] * len(good), tensor_type="numpy.ndarray"), 50))
    params, _ = strategy.aggregate_fit(1, results, [])
    assert strategy.last_round_report["rejected"] == ["c0"]
    assert strategy.last_round_report["reasons"]["c0"].startswith("undecodable parameters")
    assert params is not None


@pytest.mark.parametrize("n, reason", [(0, "positive integer"), (-4, "positive integer"), (10**12, "absurd")])
def test_bad_num_examples_rejected(small_server_set, n, reason):
    strategy, proxies = legacy(small_server_set, 4, distill_enabled=False)
    results = [(p, fit_res(benign_arrays(i), n if i == 3 else 50)) for i, p in enumerate(proxies)]
    strategy.aggregate_fit(1, results, [])
    assert strategy.last_round_report["rejected"] == ["c3"]
    assert reason in strategy.last_round_report["reasons"]["c3"]


def test_all_results_rejected_keeps_the_previous_model(small_server_set):
    strategy, proxies = legacy(small_server_set, 4)
    results = [(p, fit_res(benign_arrays(i)[:-1], 50)) for i, p in enumerate(proxies)]
    params, metrics = strategy.aggregate_fit(1, results, [RuntimeError("timeout")])
    assert params is None
    assert metrics["clipfed-accepted"] == 0 and metrics["clipfed-rejected"] == 4
    assert strategy.last_round_report["distill"] == {}


def test_soft_weights_reach_the_inner_strategy_unrounded(small_server_set, monkeypatch):
    """A soft weight below 1 must stay below 1 (not be rounded up to one example)."""
    strategy, proxies = legacy(small_server_set, 3, distill_enabled=False)
    results = [(p, fit_res(benign_arrays(i), 50 + 10 * i)) for i, p in enumerate(proxies)]
    weights = [50.0, 60.0, 0.3]

    def fake_screen(server_round, global_state, updates):
        return ScreeningOutcome(weights, [False, False, True], [{"score": 0.0}] * 3, [u.state for u in updates], True, 0.0)

    monkeypatch.setattr(strategy.defense, "screen", fake_screen)
    params, _ = strategy.aggregate_fit(1, results, [])
    k = NAMES.index("fc1.weight")
    expected = sum(w * benign_arrays(i)[k].astype(np.float64) for i, w in enumerate(weights)) / sum(weights)
    np.testing.assert_allclose(parameters_to_ndarrays(params)[k], expected, rtol=1e-6, atol=1e-8)
    assert strategy.last_round_report["weights"] == {"c0": 50.0, "c1": 60.0, "c2": 0.3}


def test_a_purified_client_is_aggregated_with_its_new_state_and_reported(small_server_set, monkeypatch):
    """``screen-purify``: the adapter aggregates the purified state the core hands back (not the reply's)
    and lists the client under ``purified``, not ``rejected``."""
    strategy, proxies = legacy(small_server_set, 3, distill_enabled=False)
    results = [(p, fit_res(benign_arrays(i), 50)) for i, p in enumerate(proxies)]
    cleaned = {k: v * 0.5 if v.dtype.kind == "f" else v for k, v in zip(NAMES, benign_arrays(2))}

    def fake_screen(server_round, global_state, updates):
        states = [u.state for u in updates[:2]] + [cleaned]
        return ScreeningOutcome([50.0, 50.0, 50.0], [False, False, True], [{"score": 0.0}] * 3, states, True, 0.0,
                                purified=[False, False, True])

    monkeypatch.setattr(strategy.defense, "screen", fake_screen)
    params, _ = strategy.aggregate_fit(1, results, [])
    k = NAMES.index("fc1.weight")
    expected = (benign_arrays(0)[k].astype(np.float64) + benign_arrays(1)[k] + cleaned["fc1.weight"]) / 3
    np.testing.assert_allclose(parameters_to_ndarrays(params)[k], expected, rtol=1e-6, atol=1e-8)
    report = strategy.last_round_report
    assert report["purified"] == ["c2"] and report["rejected"] == [] and len(report["accepted"]) == 3


def test_wraps_fedmedian(small_server_set):
    strategy = CLIPFedLegacy(FedMedian(min_fit_clients=5, min_available_clients=5),
                             H.make_defense(H.tiny_net(0), small_server_set, distill_enabled=False))
    strategy, proxies = configured(strategy, 5)
    results = [(p, fit_res(benign_arrays(i), 50)) for i, p in enumerate(proxies)]
    results[4][1].parameters = ndarrays_to_parameters([np.full_like(a, np.inf) if a.dtype.kind == "f" else a
                                                       for a in benign_arrays(4)])
    params, _ = strategy.aggregate_fit(1, results, [])
    expected, _ = FedMedian().aggregate_fit(1, results[:4], [])
    for a, b in zip(parameters_to_ndarrays(params), as_global_dtypes(parameters_to_ndarrays(expected))):
        assert np.array_equal(a, b)


def test_aggregate_fit_before_configure_fit_is_an_error(small_server_set):
    strategy = CLIPFedLegacy(inner(2), H.make_defense(H.tiny_net(0), small_server_set))
    with pytest.raises(RuntimeError, match="before configure_fit"):
        strategy.aggregate_fit(1, [], [])


# --------------------------------------------------------------------------- Flower's legacy machinery


class UserClient(NumPyClient):
    """A user's NumPyClient: plain torch model, one SGD step on random digits-shaped data."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.net = H.tiny_net(0)

    def fit(self, parameters, config):
        self.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in zip(NAMES, parameters)})
        g = torch.Generator().manual_seed(self.pid)
        x, y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt = torch.optim.SGD(self.net.parameters(), lr=0.05)
        self.net.train()
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        arrays = [v.detach().numpy() for v in self.net.state_dict().values()]
        if self.pid == 0:  # a hostile node
            arrays[NAMES.index("fc2.bias")][:] = np.nan
        return arrays, 32 + self.pid, {"loss": float(loss)}


def test_full_round_through_flowers_legacy_server(small_server_set):
    captured = {}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = CLIPFedLegacy(
            FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=4, min_available_clients=4,
                   initial_parameters=ndarrays_to_parameters(GLOBAL)),
            H.make_defense(H.tiny_net(0), small_server_set, distill={"steps": 1, "batch_size": 32}),
        )
        captured["strategy"] = strategy
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=2))

    server_app = ServerApp(server_fn=server_fn)
    client_app = ClientApp(client_fn=lambda ctx: UserClient(int(ctx.node_config["partition-id"])).to_client())
    with FakeGrid(client_app, num_nodes=4) as grid:
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    report = captured["strategy"].last_round_report
    hostile = str(grid.node_ids[0])
    assert report["rejected"] == [hostile]
    assert "NaN or Inf" in report["reasons"][hostile]
    assert sorted(report["accepted"]) == sorted(str(n) for n in grid.node_ids[1:])
    assert report["distill"]["steps"] == 1
