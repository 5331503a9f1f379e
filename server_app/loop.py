"""The round loop of the ServerApp, with per-round checkpoints and resume.

It follows ``flwr.serverapp.strategy.Strategy.start`` step for step (configure_train → send and
receive → aggregate_train → configure_evaluate → send and receive → aggregate_evaluate →
central evaluation), and adds what a long experiment needs: a checkpoint after every round (global
model, strategy state such as CLIP-Fed's projection head, RNG states, metrics so far) and resuming
from it, so a killed run loses at most the round in flight.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("clipfed")

CHECKPOINT = "checkpoint.pt"


def strategy_state(strategy: Any) -> dict[str, Any]:
    """State a strategy (or the one it wraps) keeps across rounds, if it exposes any."""
    out: dict[str, Any] = {}
    if hasattr(strategy, "defense") and hasattr(strategy.defense, "state_dict"):
        out["defense"] = strategy.defense.state_dict()
    if hasattr(strategy, "history"):
        out["history"] = dict(strategy.history)
    return out


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    if "defense" in state and hasattr(strategy, "defense"):
        strategy.defense.load_state_dict(state["defense"])
    if "history" in state and hasattr(strategy, "history"):
        strategy.history.clear()
        strategy.history.update(state["history"])


def save_checkpoint(path: Path, server_round: int, arrays: ArrayRecord, strategy: Any, rounds: list[dict],
                    config_key: str) -> None:
    state = {
        "round": server_round,
        "config_key": config_key,
        "arrays": {k: a.numpy() for k, a in arrays.items()},
        "strategy": strategy_state(strategy),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "rounds": rounds,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config_key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("config_key") != config_key:
        raise ValueError(
            f"checkpoint {path} was written by a run with another configuration; "
            "use another run-name/results-dir, or delete the checkpoint to start over"
        )
    return state


def wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> None:
    """Block until ``num_nodes`` nodes are connected, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < num_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {connected} of {num_nodes} nodes connected after {timeout:.0f}s (run-config 'num-clients' "
                f"= {num_nodes}; simulation: --federation-config \"num-supernodes={num_nodes}\")"
            )
        time.sleep(1.0)


def run_rounds(strategy: Strategy, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], *, timeout: float | None,
               checkpoint_path: Path | None, resume: bool, config_key: str,
               rounds_so_far: Callable[[], list[dict]], restore_rounds: Callable[[list[dict]], None]) -> ArrayRecord:
    """Run rounds 1..num_rounds (or resume after the last checkpointed one); returns the final arrays."""
    arrays, start = initial_arrays, 1
    state = load_checkpoint(checkpoint_path, config_key) if (resume and checkpoint_path) else None
    if state is not None:
        arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in state["arrays"].items()})
        load_strategy_state(strategy, state["strategy"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        restore_rounds(state["rounds"])
        start = int(state["round"]) + 1
        log.info("resuming from %s after round %d", checkpoint_path, state["round"])
    else:
        evaluate_fn(0, arrays)
    for server_round in range(start, num_rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid),
                                        timeout=timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        eval_replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid),
                                             timeout=timeout)
        strategy.aggregate_evaluate(server_round, eval_replies)
        evaluate_fn(server_round, arrays)
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, server_round, arrays, strategy, rounds_so_far(), config_key)
        log.debug("round %d took %.2fs", server_round, time.perf_counter() - t0)
    return arrays
