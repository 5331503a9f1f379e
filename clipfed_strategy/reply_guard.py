"""Reply validation for ANY Message-API strategy: ``ReplyGuard(FedAvg(...))``.

CLIP-Fed validates replies itself; this wrapper gives every other strategy (Flower's FedAvg,
Krum, FedMedian, the baselines in ``server_app/defenses``) the same protection: a malformed or
hostile reply (record layout, keys, shapes, dtypes, NaN/Inf, absurd norms or example counts,
inconsistent metrics) is dropped with a reason before the inner strategy sees it, instead of
crashing the ServerApp or reaching the model. The inner strategy's own attributes (for example a
defence's ``last_round_report``) stay reachable through the wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clipfed_strategy.message_api import harmonise_metrics, like_reference, parse_reply
from clipfed_strategy.validation import ValidationConfig, validate_replies

log = logging.getLogger(__name__)


class ReplyGuard(Strategy):
    """Validate replies, then delegate to ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The inner Message-API strategy.
    validation : ValidationConfig, optional
        Limits (default ``ValidationConfig()``).

    Attributes
    ----------
    guard_rejected : dict[int, str]
        The latest round's rejected node ids and reasons.
    """

    def __init__(self, strategy: Strategy, validation: ValidationConfig | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.validation = validation or ValidationConfig()
        self.arrayrecord_key = getattr(strategy, "arrayrecord_key", "arrays")
        self.weighted_by_key = getattr(strategy, "weighted_by_key", "num-examples")
        self.current: dict[str, np.ndarray] | None = None
        self.guard_rejected: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:  # the inner strategy's attributes (e.g. last_round_report)
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"ReplyGuard({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None, "aggregate_train before configure_train"
        replies = list(replies)
        rejected: dict[int, str] = {}
        parsed = []
        for m in replies:
            if m.has_error():
                continue  # the inner strategy drops error replies itself
            state, n, reason = parse_reply(m, self.arrayrecord_key, "metrics", self.weighted_by_key)
            if reason:
                rejected[m.metadata.src_node_id] = reason
            else:
                parsed.append((m, state, n))
        reasons = validate_replies([(s, n) for _, s, n in parsed], self.current, self.validation)
        kept = [m for (m, _, _), r in zip(parsed, reasons) if r is None]
        for (m, _, _), r in zip(parsed, reasons):
            if r is not None:
                rejected[m.metadata.src_node_id] = r
        for node, reason in rejected.items():
            log.info("round %d: rejected node %s: %s", server_round, node, reason)
        self.guard_rejected = rejected
        harmonise_metrics(server_round, kept)
        if not kept:
            log.warning("round %d: no valid reply: keeping the previous global model", server_round)
            return None, MetricRecord({"guard-rejected": len(rejected)})
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if arrays is not None:
            arrays = like_reference(arrays, self.current)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
