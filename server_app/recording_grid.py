"""A Grid wrapper that records what the metrics code needs from each round's replies.

It sits between the strategy and Flower's Grid and sees every reply: it notes each node's
ground-truth role (the ``ground-truth`` ConfigRecord the client adds for evaluation only), its
train loss and the wall time of the round trip. The defence never sees any of this.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class RecordingGrid(Grid):
    """Delegates everything to ``inner``; records per-node roles and losses of the latest round trip."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.last_replies: dict[int, dict[str, Any]] = {}
        self.last_seconds: float = 0.0
        self.last_return: float | None = None  # perf_counter() when the last train round trip returned

    # --- delegation of the abstract API
    def set_run(self, run) -> None:  # type: ignore[override]
        self._inner.set_run(run)

    @property
    def run(self):  # type: ignore[override]
        return self._inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[override]
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        t0 = time.perf_counter()
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        self.last_return = time.perf_counter()
        self.last_seconds = self.last_return - t0
        if messages[0].metadata.message_type.startswith("train"):
            self.last_replies = {}
            for m in replies:
                self.last_replies[m.metadata.src_node_id] = _summarise(m)
        return replies


def _summarise(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"error": m.has_error(), "malicious": None, "partition_id": None, "train_loss": None,
                           "num_examples": None}
    if m.has_error():
        out["error_reason"] = m.error.reason
        return out
    gt = m.content.config_records.get("ground-truth")
    if gt is not None:
        out["malicious"] = bool(gt.get("malicious"))
        out["partition_id"] = gt.get("partition-id")
    metrics = m.content.metric_records.get("metrics")
    if metrics is not None:
        loss, n = metrics.get("train-loss"), metrics.get("num-examples")
        out["train_loss"] = float(loss) if isinstance(loss, (int, float)) else None
        out["num_examples"] = n if isinstance(n, (int, float)) else None
    return out
