"""FoolsGold: mitigating sybils in federated learning poisoning.

Fung, Yoon and Beschastnikh, RAID 2020, https://arxiv.org/abs/1808.04866

The server keeps, per client, the sum of all updates it has sent (its
*history*). Sybils pushing the same poisoned objective have histories that are
much more similar to each other than honest clients' are. Each round:
cosine similarities ``cs_ij`` of the participants' histories; ``v_i = max_j cs_ij``;
*pardoning* ``cs_ij *= v_i / v_j`` when ``v_j > v_i``; ``alpha_i = 1 - max_j cs_ij``
clipped to [0, 1], divided by its maximum (1 becomes 0.99), then the logit
``kappa * (ln(alpha / (1 - alpha)) + 0.5)`` clipped to [0, 1]. The update is the
mean of the client updates weighted by ``alpha``.

Not implemented: the paper's feature-importance weighting of the output layer.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common import log

from . import update_math as um
from .base import Decision, DefenseConfigError, RoundInput, UpdateDefense

SIMILARITY_ON = ("all", "output")
IDENTICAL_TOL = 1e-6
"""Histories with cosine similarity above ``1 - IDENTICAL_TOL`` count as identical."""


def foolsgold_weights(histories: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """FoolsGold learning-rate weights in [0, 1] for the rows of ``histories``.

    Parameters
    ----------
    histories : np.ndarray
        ``[K, D]`` aggregate update of each participating client.
    kappa : float (default: 1.0)
        Confidence parameter of the logit.

    Returns
    -------
    np.ndarray
        float64 ``[K]``; identical histories get 0. A single client gets 1.
    """
    k = histories.shape[0]
    if k < 2:
        return np.ones(k)
    cs = um.cosine_similarity_matrix(histories)
    np.fill_diagonal(cs, -np.inf)
    v = np.maximum(cs.max(axis=1), 0.0)
    # pardoning: shrink i's similarity to j when j is the more suspicious one
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(v[None, :] > v[:, None], v[:, None] / v[None, :], 1.0)
    cs = cs * ratio
    alpha = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    alpha[alpha < IDENTICAL_TOL] = 0.0  # float32 round-off must not make clones look distinct
    top = float(alpha.max())
    if not top > 0:
        return np.zeros(k)
    alpha = alpha / top
    alpha[alpha >= 1.0] = 0.99
    with np.errstate(divide="ignore"):
        logit = kappa * (np.log(alpha / (1.0 - alpha)) + 0.5)
    return np.clip(np.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


class FoolsGold(UpdateDefense):
    """FoolsGold (Fung et al., 2020) as a Message-API strategy.

    Parameters
    ----------
    kappa : float (default: 1.0)
        Confidence parameter of the logit (> 0).
    similarity_on : str (default: "all")
        ``"all"``: histories over all trainable parameters; ``"output"``: over
        the last layer only (the module of the last trainable key), which also
        keeps the history memory small.
    trainable_keys : Collection[str] or None (default: None)
        Keys of the trainable parameters; None excludes BatchNorm running
        statistics and non-float arrays by name/dtype.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg` (same defaults).

    Notes
    -----
    Histories are keyed by ``src_node_id`` and kept for the strategy's lifetime
    (one float32 vector per client ever seen). Weights ignore ``num-examples``
    (a sybil can report any count). ``last_round_report["scores"]`` holds the
    FoolsGold weights; weight 0 means "rejected". If every weight is 0 the
    global model is kept (``kept_global`` in the report).
    """

    name = "FoolsGold"

    def __init__(
        self, *, kappa: float = 1.0, similarity_on: str = "all", **fedavg_kwargs
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not kappa > 0:
            raise DefenseConfigError(f"kappa must be > 0, got {kappa}")
        if similarity_on not in SIMILARITY_ON:
            raise DefenseConfigError(
                f"similarity_on must be one of {SIMILARITY_ON}, got {similarity_on!r}"
            )
        self.kappa = float(kappa)
        self.similarity_on = similarity_on
        self.history: dict[int, np.ndarray] = {}

    def summary(self) -> None:
        """Log the FoolsGold settings, then FedAvg's."""
        log(INFO, "\t├──> FoolsGold: kappa=%g, similarity_on=%s",
            self.kappa, self.similarity_on)
        super().summary()

    def defend(self, rnd: RoundInput) -> Decision:
        """Update histories, weight clients by history dissimilarity, average."""
        features = rnd.updates
        if self.similarity_on == "output":
            out_keys = um.output_layer_keys(rnd.trainable_keys)
            cols = um.key_columns(rnd.global_state, rnd.trainable_keys, set(out_keys))
            features = rnd.updates[:, cols]
        for node, row in zip(rnd.node_ids, features):
            if node in self.history and self.history[node].shape == row.shape:
                self.history[node] += row
            else:
                self.history[node] = row.copy()
        hist = np.stack([self.history[n] for n in rnd.node_ids])
        weights = foolsgold_weights(hist, self.kappa)

        kept_global = not float(weights.sum()) > 0
        update = None if kept_global else um.weighted_mean(rnd.updates, weights)
        accepted = [n for n, w in zip(rnd.node_ids, weights) if w > 0]
        rejected = [n for n, w in zip(rnd.node_ids, weights) if not w > 0]
        scores = {n: float(w) for n, w in zip(rnd.node_ids, weights)}
        reasons = {n: (f"weight {w:.3f}" if w > 0 else "history too similar to another: weight 0")
                   for n, w in zip(rnd.node_ids, weights)}
        summary = (f"weights > 0 for {len(accepted)}/{len(weights)} "
                   f"(min {weights.min():.3f}, mean {weights.mean():.3f})")
        if kept_global:
            summary += ": all weights 0, global model kept"
        return Decision(
            update=update,
            buffer_weights=None if kept_global else weights,
            accepted=accepted,
            rejected=rejected,
            scores=scores,
            reasons=reasons,
            summary=summary,
            extra={"kept_global": kept_global, "history_clients": len(self.history)},
        )
