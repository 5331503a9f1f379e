"""CLIP-Fed for Flower's legacy strategy API (``flwr.server.strategy``, ``aggregate_fit``).

For projects still on ``ServerApp(server_fn=...)`` with ``NumPyClient``s::

    strategy = CLIPFedLegacy(FedAvg(min_fit_clients=10), defense)    # the one-line swap

Legacy replies are lists of arrays without names; they are matched to the defence model's
``state_dict()`` keys in order (what ``[v.cpu().numpy() for v in net.state_dict().values()]``
sends). The same core runs as in :class:`~clipfed_strategy.message_api.CLIPFed`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from clipfed_strategy.core import CLIPFedDefense, ClientUpdate, screening_details

log = logging.getLogger(__name__)


class CLIPFedLegacy(Strategy):
    """CLIP-Fed around an inner legacy strategy (``flwr.server.strategy.FedAvg`` and friends).

    Parameters
    ----------
    strategy : flwr.server.strategy.Strategy
        The inner strategy that aggregates the kept results.
    defense : CLIPFedDefense
        The torch core.

    Attributes
    ----------
    last_round_report : dict
        The latest round's decisions (``accepted``/``rejected`` client ids, ``scores``, the kept
        clients' aggregation ``weights``, ``reasons``, ``seconds``, ``distill``).
    """

    def __init__(self, strategy: Strategy, defense: CLIPFedDefense) -> None:
        super().__init__()
        self.strategy = strategy
        self.defense = defense
        self.names = list(defense.param_names)
        self.current: dict[str, np.ndarray] | None = None
        self.last_round_report: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"CLIPFedLegacy({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.current = self._named(parameters_to_ndarrays(parameters))
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def _named(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(arrays) != len(self.names):
            raise ValueError(f"got {len(arrays)} arrays, the defence model has {len(self.names)} state entries")
        return dict(zip(self.names, arrays))

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        t0 = time.perf_counter()
        if self.current is None:
            raise RuntimeError("CLIPFedLegacy.aggregate_fit called before configure_fit")
        rejected: dict[str, str] = {}
        parsed: list[tuple[ClientProxy, FitRes, dict[str, np.ndarray]]] = []
        for proxy, res in results:
            try:
                arrays = parameters_to_ndarrays(res.parameters)
            except Exception as err:
                rejected[proxy.cid] = f"undecodable parameters ({type(err).__name__}: {err})"
                continue
            if len(arrays) != len(self.names):
                rejected[proxy.cid] = f"got {len(arrays)} arrays, expected {len(self.names)}"
                continue
            parsed.append((proxy, res, dict(zip(self.names, arrays))))
        reasons = self.defense.validate(self.current, [(s, r.num_examples) for _, r, s in parsed])
        valid = []
        for (proxy, res, state), reason in zip(parsed, reasons):
            if reason:
                rejected[proxy.cid] = reason
            else:
                valid.append((proxy, res, ClientUpdate(proxy.cid, state, float(res.num_examples))))
        outcome = self.defense.screen(server_round, self.current, [u for _, _, u in valid])
        kept: list[tuple[ClientProxy, FitRes]] = []
        scores: dict[str, float] = {}
        details: dict[str, dict[str, float]] = {}
        weights: dict[str, float] = {}
        purified = [proxy.cid for (proxy, _, _), p in zip(valid, outcome.purified) if p]
        for (proxy, res, u), w, rec, st in zip(valid, outcome.weights, outcome.records, outcome.states):
            if "score" in rec:
                scores[proxy.cid] = rec["score"]
            details[proxy.cid] = screening_details(rec)
            if w <= 0:
                rejected[proxy.cid] = f"screening: {rec.get('reason', 'flagged')}"
                continue
            weights[proxy.cid] = float(w)
            params = res.parameters if st is u.state else ndarrays_to_parameters([st[k] for k in self.names])
            # a soft weight stays a float (rounding would lift a down-weighted 0.3 to one full example)
            num = int(w) if float(w).is_integer() else float(w)
            kept.append((proxy, FitRes(res.status, params, num, res.metrics)))
        t_screen = time.perf_counter()
        params, metrics = (None, {})
        if kept:
            params, metrics = self.strategy.aggregate_fit(server_round, kept, failures)
        t_agg = time.perf_counter()
        dstats: dict[str, float] = {}
        if params is not None:
            import torch

            state = {k: torch.from_numpy(np.array(v)) for k, v in self._named(parameters_to_ndarrays(params)).items()}
            new_state, dstats = self.defense.distill(server_round, state)
            params = ndarrays_to_parameters([_as_dtype(new_state[k].numpy(), self.current[k].dtype) for k in self.names])
        else:
            log.warning("round %d: no result accepted (%d rejected): keeping the previous global model", server_round, len(rejected))
        t_end = time.perf_counter()
        seconds = {"screen": t_screen - t0, "aggregate": t_agg - t_screen, "distill": t_end - t_agg}
        self.last_round_report = {"accepted": [p.cid for p, _ in kept], "rejected": sorted(rejected), "purified": purified,
                                  "scores": scores, "screening": details,
                                  "weights": weights, "reasons": rejected, "seconds": seconds, "distill": dstats,
                                  "inversion": outcome.info.get("inversion"), "teacher": self.defense.teacher_info["label"]}
        for cid, reason in rejected.items():
            log.info("round %d: rejected client %s: %s", server_round, cid, reason)
        metrics = dict(metrics or {})
        metrics.update({"clipfed-accepted": len(kept), "clipfed-rejected": len(rejected),
                        **{f"clipfed-seconds-{k}": float(v) for k, v in seconds.items()}})
        return params, metrics

    # --- everything else is the inner strategy's
    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        return self.strategy.evaluate(server_round, parameters)


def _as_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` in the global model's dtype: inner strategies average integer buffers (BatchNorm's
    ``num_batches_tracked``) into float64, which the next round's replies would no longer match."""
    if arr.dtype == dtype:
        return arr
    return np.asarray(np.rint(arr) if np.dtype(dtype).kind in "iub" else arr).astype(dtype)
