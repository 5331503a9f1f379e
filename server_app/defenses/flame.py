"""FLAME: Taming Backdoors in Federated Learning.

Nguyen et al., USENIX Security 2022, https://arxiv.org/abs/2101.02281

Each round: (1) HDBSCAN on the pairwise cosine distances of the client updates
(trainable parameters only), ``min_cluster_size = K // 2 + 1``; the largest
cluster is kept, noise points and smaller clusters are rejected; (2) the kept
updates are clipped to the median L2 norm ``S_t`` of *all* updates; (3) they are
averaged and (4) Gaussian noise with ``sigma = lambda * S_t`` is added to the
trainable parameters of the new global model.

Known fail-open: under strong non-IID data HDBSCAN may label every update as
noise; FLAME then keeps everybody (clipping and noise still apply) and says so.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common import log
from sklearn.cluster import HDBSCAN

from . import update_math as um
from .base import Decision, DefenseConfigError, RoundInput, UpdateDefense


def flame_clusters(distances: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """HDBSCAN labels on a precomputed distance matrix (-1 = noise).

    Uses ``min_samples=1`` and ``allow_single_cluster=True`` so that an
    all-benign round forms one cluster. Fewer than two points: one cluster.
    """
    k = distances.shape[0]
    if k < 2:
        return np.zeros(k, dtype=int)
    clusterer = HDBSCAN(
        min_cluster_size=max(2, min(min_cluster_size, k)),
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
        copy=True,
    )
    return clusterer.fit_predict(np.array(distances, dtype=np.float64, order="C"))


def majority_mask(labels: np.ndarray) -> np.ndarray:
    """True for members of the largest non-noise cluster (all False if none)."""
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.zeros(labels.shape, dtype=bool)
    values, counts = np.unique(clustered, return_counts=True)
    return labels == values[np.argmax(counts)]


class Flame(UpdateDefense):
    """FLAME (Nguyen et al., 2022) as a Message-API strategy.

    Parameters
    ----------
    noise_lambda : float (default: 0.001)
        Noise level factor: ``sigma = noise_lambda * median_norm``. 0 disables noise.
    min_cluster_size : int or None (default: None)
        HDBSCAN ``min_cluster_size``; None means ``K // 2 + 1`` for K replies.
    weight_by_num_examples : bool (default: False)
        Average the clipped updates weighted by ``weighted_by_key`` instead of
        uniformly (the paper averages uniformly).
    seed : int (default: 0)
        Seed of the noise; round ``t`` uses ``default_rng([seed, t])``.
    trainable_keys : Collection[str] or None (default: None)
        Keys of the trainable parameters; None excludes BatchNorm running
        statistics and non-float arrays by name/dtype.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg` (same defaults).

    Notes
    -----
    ``last_round_report["scores"]`` holds each client's median cosine distance
    to the other updates (higher = more isolated). Extra report keys:
    ``median_norm``, ``noise_sigma``, ``fail_open``, ``clipped`` (node ids).
    BatchNorm statistics of the new model are the average over kept clients.
    """

    name = "FLAME"

    def __init__(
        self,
        *,
        noise_lambda: float = 0.001,
        min_cluster_size: int | None = None,
        weight_by_num_examples: bool = False,
        seed: int = 0,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not noise_lambda >= 0:
            raise DefenseConfigError(f"noise_lambda must be >= 0, got {noise_lambda}")
        if min_cluster_size is not None and min_cluster_size < 2:
            raise DefenseConfigError(
                f"min_cluster_size must be an int >= 2 or None, got {min_cluster_size}"
            )
        self.noise_lambda = float(noise_lambda)
        self.min_cluster_size = min_cluster_size
        self.weight_by_num_examples = bool(weight_by_num_examples)
        self.seed = int(seed)

    def summary(self) -> None:
        """Log the FLAME settings, then FedAvg's."""
        log(INFO, "\t├──> FLAME: noise_lambda=%g, min_cluster_size=%s, weighted=%s, seed=%d",
            self.noise_lambda, self.min_cluster_size or "K//2+1",
            self.weight_by_num_examples, self.seed)
        super().summary()

    def defend(self, rnd: RoundInput) -> Decision:
        """Cluster, clip to the median norm, average, add noise."""
        k = len(rnd.node_ids)
        u = rnd.updates
        distances = um.cosine_distance_matrix(u)
        mcs = self.min_cluster_size or k // 2 + 1
        labels = flame_clusters(distances, mcs)
        keep = majority_mask(labels)
        fail_open = not keep.any()
        if fail_open:
            keep = np.ones(k, dtype=bool)

        norms = um.l2_norms(u)
        median_norm = float(np.median(norms)) if k else 0.0
        factors = um.clip_factors(norms, median_norm)
        weights = keep * (rnd.num_examples if self.weight_by_num_examples else 1.0)
        if not weights.sum() > 0:  # every kept client reported 0 examples
            weights = keep.astype(np.float64)
        update = um.weighted_sum(u, weights * factors / weights.sum())
        sigma = self.noise_lambda * median_norm
        if sigma > 0:
            rng = np.random.default_rng([self.seed, rnd.server_round])
            update = update + rng.normal(0.0, sigma, size=update.shape)

        scores, reasons = {}, {}
        for i, node in enumerate(rnd.node_ids):
            others = np.delete(distances[i], i)
            scores[node] = float(np.median(others)) if others.size else 0.0
            if fail_open:
                reasons[node] = "fail-open: HDBSCAN labelled every update noise"
            elif keep[i]:
                reasons[node] = f"majority cluster {labels[i]}"
            else:
                reasons[node] = "noise" if labels[i] < 0 else f"minority cluster {labels[i]}"
            if keep[i] and factors[i] < 1:
                reasons[node] += f", clipped x{factors[i]:.3g}"
        accepted = [n for n, kp in zip(rnd.node_ids, keep) if kp]
        rejected = [n for n, kp in zip(rnd.node_ids, keep) if not kp]
        clipped = [n for n, kp, f in zip(rnd.node_ids, keep, factors) if kp and f < 1]
        summary = (
            f"kept {len(accepted)}/{k}"
            + (" (FAIL-OPEN: all updates were noise, kept all)" if fail_open else "")
            + f", clipped {len(clipped)} to median norm {median_norm:.4g}"
            + f", noise sigma {sigma:.3g}"
        )
        return Decision(
            update=update,
            buffer_weights=weights,
            accepted=accepted,
            rejected=rejected,
            scores=scores,
            reasons=reasons,
            summary=summary,
            extra={"median_norm": median_norm, "noise_sigma": sigma,
                   "fail_open": fail_open, "clipped": clipped},
        )
