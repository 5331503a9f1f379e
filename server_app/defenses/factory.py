"""``defense = flame | fltrust | foolsgold | rlr``: build a baseline from run-config.

Run-config keys (all optional): ``flame-noise-lambda`` (0.001), ``fltrust-server-lr`` (1.0),
``foolsgold-kappa`` (1.0), ``rlr-threshold`` (0 = auto: about a quarter of the sampled clients,
at least 2). FLTrust's server update is one local training pass on the server's *synthesised*
dataset (the same one CLIP-Fed uses, see ``server_app/clipfed_setup.py``), never on client data.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from fltask.config import ConfigError, RunConfig
from fltask.datasets import TaskData
from fltask.partition import Split
from fltask.training import train_local
from server_app.defenses import Flame, FLTrust, FoolsGold, RobustLR
from server_app.defenses.update_math import trainable_keys_of
from server_app.strategies import BuiltStrategy

log = logging.getLogger("clipfed")

DEFAULTS: dict[str, Any] = {
    "flame-noise-lambda": 0.001,
    "fltrust-server-lr": 1.0,
    "foolsgold-kappa": 1.0,
    "rlr-threshold": 0.0,
}


def _get(cfg: RunConfig, key: str) -> float:
    value = cfg.extra.get(key, DEFAULTS[key])
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key '{key}' must be a number, got {value!r}") from None


def fltrust_server_update_fn(cfg: RunConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``g0 = train(w_t) − w_t`` on the server's clean synthesised images, as FLTrust's root update."""
    net = copy.deepcopy(model)

    def server_update(global_state: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in global_state.items()})
        train_local(net, x, y, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, seed=cfg.seed * 7919 + server_round)
        return {k: v.detach().cpu().numpy() - global_state[k] for k, v in net.state_dict().items()}

    return server_update


def build_baseline_defense(cfg: RunConfig, model: nn.Module, data: TaskData, split: Split, kw: dict[str, Any]) -> BuiltStrategy:
    d = cfg.defense
    # our models keep input-normalisation buffers: only parameters count as trainable
    kw = {**kw, "trainable_keys": trainable_keys_of(model)}
    if d == "flame":
        return BuiltStrategy(Flame(noise_lambda=_get(cfg, "flame-noise-lambda"), seed=cfg.seed, **kw))
    if d == "foolsgold":
        return BuiltStrategy(FoolsGold(kappa=_get(cfg, "foolsgold-kappa"), **kw))
    if d == "rlr":
        thr = _get(cfg, "rlr-threshold") or max(2.0, round(0.25 * cfg.num_clients * cfg.fraction_train))
        return BuiltStrategy(RobustLR(threshold=thr, **kw), {"rlr_threshold": thr})
    if d == "fltrust":
        from server_app.clipfed_setup import server_dataset, teacher_spec
        from clipfed_strategy.teacher import load_teacher

        teacher = load_teacher(teacher_spec(cfg, data, split), list(data.class_names))
        sds = server_dataset(cfg, data, teacher)
        x, y, variants, _ = sds.to_tensors("cpu")
        clean = variants == 0
        log.info("FLTrust root dataset: %d clean synthesised server images (%s)", int(clean.sum()), teacher.identity)
        fn = fltrust_server_update_fn(cfg, model, x[clean], y[clean])
        header = {"teacher": {"identity": teacher.identity, "is_standin": teacher.is_standin},
                  "server_dataset": {"images": int(clean.sum()), "hash": sds.hash}}
        return BuiltStrategy(FLTrust(server_update_fn=fn, server_lr=_get(cfg, "fltrust-server-lr"), **kw), header)
    raise ConfigError(f"run-config key 'defense' is {d!r}: no builder for it")
