"""FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping.

Cao et al., NDSS 2021, https://arxiv.org/abs/2012.13995

The server computes its own update ``g_0`` on a small root dataset (here: a
user-supplied callable, which in clipfed trains on the server's *synthesised*
dataset, never on client data). Each client update ``g_i`` gets the trust score
``TS_i = ReLU(cos(g_i, g_0))``, is rescaled to the norm of ``g_0``, and the new
global model is ``w_t + server_lr * sum_i TS_i * g_i * |g_0|/|g_i| / sum_i TS_i``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.common import log

from . import update_math as um
from .base import Decision, DefenseConfigError, RoundInput, UpdateDefense

ServerUpdateFn = Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]


def trust_scores(updates: np.ndarray, server_update: np.ndarray) -> np.ndarray:
    """``ReLU(cos(g_i, g_0))`` for each row ``g_i`` (0 where a norm is 0)."""
    return np.maximum(um.cosine_to(updates, server_update), 0.0)


def fltrust_update(
    updates: np.ndarray, server_update: np.ndarray, trust: np.ndarray
) -> np.ndarray | None:
    """Trust-weighted mean of the updates rescaled to ``|g_0|``; None if no trust.

    ``sum_i TS_i * (|g_0| / |g_i|) * g_i / sum_i TS_i`` (float64 vector).
    """
    total = float(trust.sum())
    if not total > 0:
        return None
    norm0 = float(np.linalg.norm(server_update.astype(np.float64)))
    norms = um.l2_norms(updates)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > 0, norm0 / norms, 0.0)
    return um.weighted_sum(updates, trust * scale / total)


class FLTrust(UpdateDefense):
    """FLTrust (Cao et al., 2021) as a Message-API strategy.

    Parameters
    ----------
    server_update_fn : Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]
        ``server_update_fn(global_state, server_round)`` returns the server
        update ``g_0`` as a *difference* ``w_server - w_t`` keyed like the
        global state (at least every trainable key), e.g. one short training
        pass on the server's synthesised dataset minus the input state.
        Required.
    server_lr : float (default: 1.0)
        Step applied to the trust-weighted update.
    trainable_keys : Collection[str] or None (default: None)
        Keys of the trainable parameters; None excludes BatchNorm running
        statistics and non-float arrays by name/dtype.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg` (same defaults).

    Notes
    -----
    ``last_round_report["scores"]`` holds the trust scores; clients with trust 0
    are "rejected". Extra report keys: ``server_update_norm``,
    ``server_update_seconds``, ``kept_global`` (True when total trust was 0 and
    the global model was kept). BatchNorm statistics of the new model are the
    trust-weighted average of the clients'.
    """

    name = "FLTrust"

    def __init__(
        self,
        *,
        server_update_fn: ServerUpdateFn,
        server_lr: float = 1.0,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not callable(server_update_fn):
            raise DefenseConfigError("server_update_fn must be a callable")
        if not server_lr > 0:
            raise DefenseConfigError(f"server_lr must be > 0, got {server_lr}")
        self.server_update_fn = server_update_fn
        self.server_lr = float(server_lr)

    def summary(self) -> None:
        """Log the FLTrust settings, then FedAvg's."""
        log(INFO, "\t├──> FLTrust: server_lr=%g, server_update_fn=%s",
            self.server_lr, getattr(self.server_update_fn, "__name__", "callable"))
        super().summary()

    def defend(self, rnd: RoundInput) -> Decision:
        """Score each update against the server update and aggregate by trust."""
        start = time.perf_counter()
        server_delta = self.server_update_fn(dict(rnd.global_state), rnd.server_round)
        missing = [k for k in rnd.trainable_keys if k not in server_delta]
        if missing:
            raise ValueError(f"server_update_fn result lacks trainable keys {missing[:5]}")
        g0 = um.flatten(server_delta, rnd.trainable_keys)
        server_seconds = time.perf_counter() - start
        norm0 = float(np.linalg.norm(g0.astype(np.float64)))

        trust = trust_scores(rnd.updates, g0)
        update = fltrust_update(rnd.updates, g0, trust)
        kept_global = update is None
        if update is not None:
            update = self.server_lr * update

        accepted = [n for n, t in zip(rnd.node_ids, trust) if t > 0]
        rejected = [n for n, t in zip(rnd.node_ids, trust) if not t > 0]
        scores = {n: float(t) for n, t in zip(rnd.node_ids, trust)}
        reasons = {
            n: (f"trust {t:.3f}" if t > 0 else "cosine to server update <= 0: trust 0")
            for n, t in zip(rnd.node_ids, trust)
        }
        if kept_global:
            summary = (f"total trust 0 over {len(trust)} updates "
                       f"(|g0|={norm0:.4g}): global model kept")
        else:
            summary = (f"trusted {len(accepted)}/{len(trust)}, trust sum {trust.sum():.3f}, "
                       f"updates rescaled to |g0|={norm0:.4g}")
        return Decision(
            update=update,
            buffer_weights=None if kept_global else trust,
            accepted=accepted,
            rejected=rejected,
            scores=scores,
            reasons=reasons,
            summary=summary,
            extra={"server_update_norm": norm0, "server_update_seconds": server_seconds,
                   "kept_global": kept_global},
        )
