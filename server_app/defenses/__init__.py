"""Baseline backdoor defences as Flower Message-API strategies.

Each is a :class:`flwr.serverapp.strategy.FedAvg` subclass that computes client
updates against the global arrays it sent, aggregates them its own way, and
records per-client decisions in ``last_round_report``.
"""

from .base import DefenseConfigError, UpdateDefense
from .flame import Flame
from .fltrust import FLTrust
from .foolsgold import FoolsGold
from .rlr import RobustLR

__all__ = ["DefenseConfigError", "FLTrust", "Flame", "FoolsGold", "RobustLR", "UpdateDefense"]
