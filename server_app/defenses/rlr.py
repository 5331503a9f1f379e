"""RLR: Defending against Backdoors in Federated Learning with Robust Learning Rate.

Ozdayi, Kantarcioglu and Gel, AAAI 2021, https://arxiv.org/abs/2007.03767

Per coordinate, the server counts how many clients agree on the sign of their
update: if ``|sum_i sign(delta_i)| < theta`` the server learning rate of that
coordinate is ``-eta``, otherwise ``+eta``. The new model is
``w_t + lr * mean_i(delta_i)`` (mean weighted by ``num-examples`` by default, as
in the authors' code). BatchNorm statistics are averaged, never flipped.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common import log

from . import update_math as um
from .base import Decision, DefenseConfigError, RoundInput, UpdateDefense


def effective_threshold(threshold: float, num_clients: int) -> float:
    """``threshold`` if >= 1 (a vote count), else ``threshold * num_clients``."""
    return float(threshold) if threshold >= 1 else float(threshold) * num_clients


def sign_votes(updates: np.ndarray) -> np.ndarray:
    """``sum_i sign(updates[i])`` per coordinate (float64)."""
    votes = np.zeros(updates.shape[1], dtype=np.float64)
    for row in updates:
        votes += np.sign(row)
    return votes


def robust_learning_rates(updates: np.ndarray, theta: float, eta: float = 1.0) -> np.ndarray:
    """Per-coordinate server learning rate: ``-eta`` where ``|sum sign| < theta``, else ``eta``."""
    return np.where(np.abs(sign_votes(updates)) < theta, -eta, eta)


class RobustLR(UpdateDefense):
    """Robust learning rate (Ozdayi et al., 2021) as a Message-API strategy.

    Parameters
    ----------
    threshold : float (default: 2.0)
        Sign-agreement threshold theta. A value >= 1 is a number of votes; a
        value in (0, 1) is a fraction of the round's number of replies K
        (theta = threshold * K). Must be > 0.
    server_lr : float (default: 1.0)
        eta, the magnitude of the server learning rate (> 0).
    weight_by_num_examples : bool (default: True)
        Average the updates weighted by ``weighted_by_key`` (else uniformly).
    trainable_keys : Collection[str] or None (default: None)
        Keys of the trainable parameters; None excludes BatchNorm running
        statistics and non-float arrays by name/dtype.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg` (same defaults).

    Notes
    -----
    RLR rejects nobody: ``accepted`` lists every client and ``scores`` holds the
    fraction of coordinates where a client's sign agrees with the majority
    sign. Extra report keys: ``threshold`` (effective theta),
    ``flipped_fraction``, ``flipped_coordinates``.
    """

    name = "RLR"

    def __init__(
        self,
        *,
        threshold: float = 2.0,
        server_lr: float = 1.0,
        weight_by_num_examples: bool = True,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not threshold > 0:
            raise DefenseConfigError(
                f"threshold must be a vote count >= 1 or a fraction in (0, 1), got {threshold}"
            )
        if not server_lr > 0:
            raise DefenseConfigError(f"server_lr must be > 0, got {server_lr}")
        self.threshold = float(threshold)
        self.server_lr = float(server_lr)
        self.weight_by_num_examples = bool(weight_by_num_examples)

    def summary(self) -> None:
        """Log the RLR settings, then FedAvg's."""
        log(INFO, "\t├──> RLR: threshold=%g, server_lr=%g, weighted=%s",
            self.threshold, self.server_lr, self.weight_by_num_examples)
        super().summary()

    def defend(self, rnd: RoundInput) -> Decision:
        """Average the updates and flip the step where signs disagree."""
        k = len(rnd.node_ids)
        theta = effective_threshold(self.threshold, k)
        votes = sign_votes(rnd.updates)
        lr = np.where(np.abs(votes) < theta, -self.server_lr, self.server_lr)
        weights = rnd.num_examples if self.weight_by_num_examples else np.ones(k)
        update = lr * um.weighted_mean(rnd.updates, weights)

        flipped = int((lr < 0).sum())
        fraction = flipped / lr.size if lr.size else 0.0
        majority = np.sign(votes)
        agree = np.array([np.mean(np.sign(row) == majority) for row in rnd.updates]) if lr.size else np.ones(k)
        scores = {n: float(a) for n, a in zip(rnd.node_ids, agree)}
        reasons = {n: f"sign agreement {a:.3f}" for n, a in zip(rnd.node_ids, agree)}
        summary = (f"all {k} kept; learning rate -{self.server_lr:g} on {flipped}/{lr.size} "
                   f"coordinates ({100 * fraction:.1f}%) with |sum sign| < {theta:g}")
        return Decision(
            update=update,
            buffer_weights=weights,
            accepted=list(rnd.node_ids),
            rejected=[],
            scores=scores,
            reasons=reasons,
            summary=summary,
            extra={"threshold": theta, "flipped_fraction": fraction,
                   "flipped_coordinates": flipped},
        )
