"""Build the strategy named by run-config key ``defense``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from torch import nn

from fltask.config import RunConfig
from fltask.datasets import TaskData
from fltask.partition import Split

log = logging.getLogger(__name__)


@dataclass
class BuiltStrategy:
    """The strategy plus what the results header should say about it (e.g. which teacher)."""

    strategy: Strategy
    header: dict[str, Any] = field(default_factory=dict)


def common_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        # the ServerApp waits once for all num-clients nodes before round 1 (server_app.loop.wait_for_nodes);
        # after that a dead node must not stall every later round in Flower's unbounded wait
        "min_available_nodes": 1,
    }


def expected_attackers_per_round(cfg: RunConfig) -> int:
    """Krum/Bulyan's a-priori f: the configured value, else the attackers expected in a round."""
    if cfg.krum_num_malicious >= 0:
        return cfg.krum_num_malicious
    return int(round(cfg.num_attackers * cfg.fraction_train))


def build_strategy(cfg: RunConfig, model: nn.Module, data: TaskData, split: Split) -> BuiltStrategy:
    """The strategy for ``cfg.defense``; all but CLIP-Fed (which validates itself) behind a ReplyGuard."""
    built = _build(cfg, model, data, split)
    if cfg.defense != "clipfed":
        from clipfed_strategy.reply_guard import ReplyGuard

        built.strategy = ReplyGuard(built.strategy)
    return built


def _build(cfg: RunConfig, model: nn.Module, data: TaskData, split: Split) -> BuiltStrategy:
    kw = common_kwargs(cfg)
    d = cfg.defense
    if d == "fedavg":
        return BuiltStrategy(FedAvg(**kw))
    if d == "oracle":  # benchmark reference: FedAvg without the attackers, by ground truth
        from server_app.defenses.oracle import OracleFedAvg

        return BuiltStrategy(OracleFedAvg(**kw), {"note": "oracle: FedAvg over the benign replies by simulation "
                                                          "ground truth; a reference, not a defence"})
    if d == "median":
        return BuiltStrategy(FedMedian(**kw))
    if d == "trimmedmean":
        return BuiltStrategy(FedTrimmedAvg(beta=cfg.trimmed_beta, **kw))
    f = expected_attackers_per_round(cfg)
    if d == "krum":
        return BuiltStrategy(Krum(num_malicious_nodes=f, **kw))
    if d == "multikrum":
        sampled = max(1, int(cfg.num_clients * cfg.fraction_train))
        return BuiltStrategy(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, sampled - f), **kw))
    if d == "bulyan":
        return BuiltStrategy(Bulyan(num_malicious_nodes=f, **kw))
    if d == "clipfed":
        from server_app.clipfed_setup import build_clipfed

        return build_clipfed(cfg, model, data, split, kw)
    from server_app.defenses.factory import build_baseline_defense

    return build_baseline_defense(cfg, model, data, split, kw)
