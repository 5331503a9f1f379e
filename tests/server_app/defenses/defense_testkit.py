"""Tiny model states and train replies for the defence tests."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flower_harness import reply_message
from server_app.defenses import update_math as um

SHAPES = {
    "conv.weight": (2, 5),
    "bn.weight": (2,),
    "bn.bias": (2,),
    "bn.running_mean": (2,),
    "bn.running_var": (2,),
    "bn.num_batches_tracked": (),
    "fc.weight": (3, 2),
    "fc.bias": (3,),
}
TRAINABLE = ["conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias"]
DIM = 23  # trainable coordinates
BN_STATS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def tiny_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A global model state with float32 weights and BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    state = {}
    for k, shape in SHAPES.items():
        if k.endswith("num_batches_tracked"):
            state[k] = np.array(7, dtype=np.int64)
        elif k.endswith("running_var"):
            state[k] = np.ones(shape, dtype=np.float32)
        else:
            state[k] = rng.normal(size=shape).astype(np.float32)
    return state


def client_state(global_state: dict, update: np.ndarray, bn: dict | None = None) -> dict:
    """``global_state`` plus a flat trainable ``update``; BN statistics from ``bn`` (else global)."""
    delta = um.unflatten(np.asarray(update, dtype=np.float64), global_state, TRAINABLE)
    out = {k: np.array(v, copy=True) for k, v in global_state.items()}
    for k, d in delta.items():
        out[k] = (global_state[k] + d).astype(np.float32)
    for k, v in (bn or {}).items():
        out[k] = np.asarray(v, dtype=global_state[k].dtype)
    return out


def train_reply(state: dict, node_id: int, num_examples: int = 10, malicious: bool = False) -> Message:
    """A train reply shaped like the clipfed ClientApp's (with a ground-truth record)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.array(v, order="C")) for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5}),
            "ground-truth": ConfigRecord({"malicious": malicious, "partition-id": node_id}),
        }
    )
    return reply_message(content, src_node_id=node_id)


def prime(strategy, global_state: dict):
    """Give ``strategy`` the global arrays w_t, as ``configure_train`` would."""
    strategy.current_arrays = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in global_state.items()})
    return strategy


def as_state(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def trainable_delta(new: dict, old: dict) -> np.ndarray:
    return um.flatten(new, TRAINABLE).astype(np.float64) - um.flatten(old, TRAINABLE).astype(np.float64)
