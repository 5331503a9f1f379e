"""ClientApp (Flower Message API): local SGD; attackers train on poisoned data.

Whether a client attacks is decided from run-config (``malicious-ids`` or ``malicious-fraction`` +
``seed``, fixed or re-drawn per round) and its ``partition-id``. Every reply carries the model
(``arrays``), ``metrics`` with ``num-examples`` and ``train-loss``, and a separate ``ground-truth``
ConfigRecord (the client's true role) that only the metrics code reads, never a defence.

With ``neurotoxin-topk`` > 0 a client that may attack keeps the global model it received in
``context.state`` (persisted per node by Flower); as an attacker it estimates the benign update as
(this global − that one) and trains under Neurotoxin's gradient mask.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fltask.attacks import (
    TriggerSpec,
    benign_update_estimate,
    boost_update,
    dba_piece,
    malicious_partitions,
    neurotoxin_mask,
)
from fltask.config import parse_run_config
from fltask.datasets import load_task_data
from fltask.models import build_model
from fltask.partition import make_split
from fltask.training import Poisoning, attack_success_rate, main_accuracy, to_tensor, train_local

log = logging.getLogger(__name__)
app = ClientApp()

_DATA: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per-process cache: (config key, partition) → tensors
PREV_GLOBAL = "neurotoxin-previous-global"  # context.state key: the global model seen at the last participation


def _partition_tensors(cfg, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (cfg.dataset, cfg.dataset_source, cfg.dataset_path, cfg.test_size, cfg.partition, cfg.alpha,
           cfg.num_clients, cfg.seed, cfg.heldout_size, cfg.lt_imbalance, cfg.min_partition_size,
           cfg.max_train_per_client, partition_id)
    if key not in _DATA:
        data = load_task_data(cfg)
        idx = make_split(cfg, data).partitions[partition_id]
        _DATA[key] = (to_tensor(data.x_train[idx]), torch.from_numpy(data.y_train[idx]))
    return _DATA[key]


def _device(cfg) -> torch.device:
    """run-config ``device``: "auto" = CUDA when this process sees one, else CPU."""
    name = str(cfg.extra.get("device", "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _setup(msg: Message, context: Context):
    cfg = parse_run_config(context.run_config)
    pid = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", cfg.num_clients))
    if num_partitions != cfg.num_clients:
        raise ValueError(
            f"this SuperNode says num-partitions={num_partitions} but run-config 'num-clients' is {cfg.num_clients}: "
            "start the federation with as many SuperNodes as num-clients (simulation: "
            f"--federation-config \"num-supernodes={cfg.num_clients}\")"
        )
    data = load_task_data(cfg)
    h, w, c = data.image_shape
    model = build_model(cfg.model, c, data.num_classes, h)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, pid, data, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, data, model = _setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 1))
    x, y = _partition_tensors(cfg, pid)
    attackers = malicious_partitions(cfg, server_round)
    malicious = pid in attackers
    poisoning = None
    if malicious:
        spec = TriggerSpec.from_config(cfg, data.image_shape[0])
        piece = dba_piece(cfg, pid, server_round) if cfg.attack == "dba" else None
        poisoning = Poisoning(spec, cfg.poison_rate, piece, cfg.pgd_radius,
                              _neurotoxin(cfg, model, context, pid, server_round))
    device = _device(cfg)
    if device.type != "cpu":  # paper-scale runs: clients train on the GPU their SuperNode/Ray actor was given
        model.to(device)
        x, y = x.to(device), y.to(device)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    if cfg.neurotoxin_topk > 0 and cfg.attack != "none" and _may_attack(cfg, pid, server_round):
        context.state[PREV_GLOBAL] = ArrayRecord(global_state)
    t0 = time.perf_counter()
    loss = train_local(
        model, x, y,
        epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, seed=cfg.seed * 1_000_003 + server_round * 1009 + pid, poisoning=poisoning,
    )
    state = model.state_dict()
    if malicious and cfg.boost_factor != 1.0:
        state = boost_update(state, global_state, cfg.boost_factor)
    state = {k: v.detach().cpu() for k, v in state.items()}
    seconds = time.perf_counter() - t0
    log.info("client %d round %d: %s, %d examples, loss %.4f, %.2fs",
             pid, server_round, "MALICIOUS" if malicious else "benign", len(y), loss, seconds)
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": int(len(y)), "train-loss": float(loss), "train-seconds": seconds}),
            "ground-truth": ConfigRecord({"malicious": bool(malicious), "partition-id": pid}),
        }
    )
    return Message(content=content, reply_to=msg)


def _may_attack(cfg, pid: int, server_round: int) -> bool:
    """Whether this client can be an attacker now or later (it then keeps the global for Neurotoxin)."""
    if cfg.attacker_sampling == "per-round" and not cfg.malicious_id_set:
        return True
    return pid in malicious_partitions(cfg, max(server_round, cfg.attack_start_round))


def _neurotoxin(cfg, model: torch.nn.Module, context: Context, pid: int, server_round: int):
    """Neurotoxin's gradient mask from (this global − the global this node saw last), or None when off."""
    if cfg.neurotoxin_topk <= 0:
        return None
    keys = [name for name, p in model.named_parameters() if p.requires_grad]
    prev = context.state[PREV_GLOBAL].to_torch_state_dict() if PREV_GLOBAL in context.state else None
    estimate = benign_update_estimate(model.state_dict(), prev, keys)
    mask = neurotoxin_mask(estimate, cfg.neurotoxin_topk)
    log.info("client %d round %d: Neurotoxin freezes %.0f%% of %d coordinates (benign estimate from %s)",
             pid, server_round, 100 * cfg.neurotoxin_topk, sum(m.numel() for m in mask.values()),
             "the previous global" if prev is not None else "the global weights (no previous global yet)")
    return mask


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local MA (and ASR, when there is an attack) of the global model on this client's partition."""
    cfg, pid, data, model = _setup(msg, context)
    x, y = _partition_tensors(cfg, pid)
    metrics = {"num-examples": int(len(y)), "ma": main_accuracy(model, x, y)}
    if cfg.attack != "none":
        asr = attack_success_rate(model, x, y, TriggerSpec.from_config(cfg, data.image_shape[0]))
        metrics["asr"] = 0.0 if asr != asr else asr
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
