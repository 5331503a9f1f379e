"""``defense = "oracle"``: a benchmark reference, **not a defence**.

FedAvg over the replies whose ``"ground-truth"`` ConfigRecord (attached by this project's
simulated clients for the metrics code) says *benign*: the model a perfect filter would give.
It answers "how much accuracy does leaving the attackers' partitions out cost on this split?",
the floor under any defence that drops clients (CLIP-Fed's screening, Krum, FLAME...). A real
deployment has no ground truth; a reply without the record counts as benign.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedAvg


def is_attacker(message: Message) -> bool:
    """The simulation's ground truth for one reply (False for errors and replies without it)."""
    if message.has_error():
        return False
    gt = message.content.config_records.get("ground-truth")
    return gt is not None and bool(gt.get("malicious"))


class OracleFedAvg(FedAvg):
    """FedAvg without the replies the simulation marks as attackers (a reference, not a defence)."""

    name = "oracle"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        replies = list(replies)
        attacker = [is_attacker(m) for m in replies]
        kept = [m for m, bad in zip(replies, attacker) if not bad]
        dropped = [m.metadata.src_node_id for m, bad in zip(replies, attacker) if bad]
        self.last_round_report = {
            "accepted": [m.metadata.src_node_id for m in kept if not m.has_error()],
            "rejected": dropped,
            "scores": {},
            "reasons": {n: "attacker (simulation ground truth; oracle reference)" for n in dropped},
        }
        out = super().aggregate_train(server_round, kept) if kept else (None, None)
        self.last_round_report["seconds"] = time.perf_counter() - start
        log(INFO, "oracle round %d: %d attacker replies left out by ground truth", server_round, len(dropped))
        return out
