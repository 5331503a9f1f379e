"""Splitting the training set: held-out split, long tail, client partitions.

Order (all seeded, all reproducible):

1. :func:`heldout_split` reserves a clean, class-balanced held-out split of the training set. It is
   disjoint from every client partition and from the test set; it exists only to build the offline
   *stand-in* teacher (no CLIP weights can be downloaded offline). It depends on the dataset and
   ``heldout-size`` only, never on the run seed, so one stand-in serves every seed.
2. :func:`long_tail` (``cifar10-lt``) subsamples the remaining pool to an exponential profile
   n_c = n_max · r^(−c/(C−1)), r = ``lt-imbalance``.
3. :func:`partition_pool` splits the pool over clients: Dirichlet(α) over labels (flwr-datasets'
   ``DirichletPartitioner``) or IID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fltask.config import ConfigError, RunConfig
from fltask.datasets import TaskData

_HELDOUT_SEED = 7_000_003


@dataclass(frozen=True)
class Split:
    """Indices into ``TaskData.x_train``: the held-out split, the client pool and each partition."""

    heldout: np.ndarray
    pool: np.ndarray
    partitions: tuple[np.ndarray, ...]


def heldout_split(labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced held-out indices of ``size`` and the rest, sorted."""
    n = len(labels)
    if size >= n:
        raise ConfigError(f"run-config key 'heldout-size' ({size}) must be smaller than the training set ({n})")
    rng = np.random.default_rng(_HELDOUT_SEED)
    classes = np.unique(labels)
    chosen: list[np.ndarray] = []
    per_class = size // len(classes)
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        take = per_class + (1 if i < size - per_class * len(classes) else 0)
        chosen.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    held = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(n), held)
    return held.astype(np.int64), rest.astype(np.int64)


def long_tail(labels: np.ndarray, pool: np.ndarray, imbalance: float, seed: int) -> np.ndarray:
    """Subsample ``pool`` so class c keeps ⌊n_max · imbalance^(−c/(C−1))⌋ images."""
    rng = np.random.default_rng(seed + 101)
    classes = np.unique(labels[pool])
    n_max = min(int(np.sum(labels[pool] == c)) for c in classes)
    keep: list[np.ndarray] = []
    num = len(classes)
    for rank, c in enumerate(classes):
        n_c = int(np.floor(n_max * imbalance ** (-rank / max(num - 1, 1))))
        idx = pool[labels[pool] == c]
        keep.append(rng.choice(idx, size=max(n_c, 1), replace=False))
    return np.sort(np.concatenate(keep))


def long_tail_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """The per-class counts :func:`long_tail` produces (for docs and tests)."""
    return [max(int(np.floor(n_max * imbalance ** (-c / max(num_classes - 1, 1)))), 1) for c in range(num_classes)]


def iid_partition(pool: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 202)
    return [np.sort(p) for p in np.array_split(rng.permutation(pool), num_partitions)]


def dirichlet_partition(
    labels: np.ndarray, pool: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Dirichlet(α) label skew over ``num_partitions`` clients via flwr-datasets' partitioner."""
    import datasets as hf_datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    table = hf_datasets.Dataset.from_dict({"label": labels[pool].tolist(), "idx": pool.tolist()})
    min_size = max(0, min(min_size, len(pool) // (2 * num_partitions)))
    part = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    part.dataset = table
    try:
        return [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_partitions)]
    except ValueError as err:
        raise ConfigError(
            f"Dirichlet partitioning failed for alpha={alpha}, num-clients={num_partitions}: {err} "
            "(lower 'min-partition-size' or raise 'alpha')"
        ) from err


_SPLITS: dict[tuple, Split] = {}  # per-process cache keyed by everything that determines the split


def make_split(cfg: RunConfig, data: TaskData) -> Split:
    """The held-out split, the (long-tailed) pool and the client partitions for ``cfg``."""
    key = (
        data.source, len(data.y_train), cfg.dataset, cfg.heldout_size, cfg.lt_imbalance, cfg.partition,
        cfg.alpha, cfg.num_clients, cfg.seed, cfg.min_partition_size, cfg.max_train_per_client,
    )
    if key in _SPLITS:
        return _SPLITS[key]
    labels = data.y_train
    held, pool = heldout_split(labels, cfg.heldout_size)
    if cfg.dataset == "cifar10-lt":
        pool = long_tail(labels, pool, cfg.lt_imbalance, cfg.seed)
    if cfg.partition == "iid":
        parts = iid_partition(pool, cfg.num_clients, cfg.seed)
    else:
        parts = dirichlet_partition(labels, pool, cfg.num_clients, cfg.alpha, cfg.seed, cfg.min_partition_size)
    if cfg.max_train_per_client > 0:
        rng = np.random.default_rng(cfg.seed + 303)
        parts = [
            np.sort(rng.choice(p, size=cfg.max_train_per_client, replace=False)) if len(p) > cfg.max_train_per_client else p
            for p in parts
        ]
    split = Split(held, pool, tuple(parts))
    _SPLITS[key] = split
    return split
