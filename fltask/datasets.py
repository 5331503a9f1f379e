"""Datasets of the federated task, as uint8 NHWC arrays.

Sources:

* ``digits`` — scikit-learn's bundled 8×8 grey digits (1,797 images). Ships with a dependency, so
  the default federation runs offline on a fresh machine. There is no official test split: the last
  ``test-size`` images of a fixed shuffle are the test set.
* ``cifar10`` / ``cifar10-lt`` — from an ``.npz`` (``x_train, y_train, x_test, y_test``), a local
  torchvision-style ``cifar-10-batches-py`` folder, or flwr-datasets (``uoft-cs/cifar10``, online).
  The long tail of ``cifar10-lt`` is applied to the training pool in :mod:`fltask.partition`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fltask.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

DIGITS_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
_SPLIT_SEED = 20240601  # fixed: the digits test split never depends on the run seed


@dataclass(frozen=True)
class TaskData:
    """A dataset as arrays: images uint8 [N,H,W,C], labels int64, class names in label order."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


_CACHE: dict[tuple, TaskData] = {}  # deliberate per-process cache, keyed by what determines the data


def load_task_data(cfg: RunConfig) -> TaskData:
    """Load (once per process) the dataset named by ``cfg.dataset`` from ``cfg.dataset_source``."""
    key = (cfg.dataset, cfg.dataset_source, cfg.dataset_path, cfg.test_size)
    if key not in _CACHE:
        if cfg.dataset == "digits":
            data = load_digits(cfg.test_size)
        else:
            data = load_cifar10(cfg.dataset_source, cfg.dataset_path)
        _CACHE[key] = data
    return _CACHE[key]


def load_digits(test_size: int = 360) -> TaskData:
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    x, y = x[order], y[order]
    if not 0 < test_size < len(y):
        raise ConfigError(f"run-config key 'test-size' must lie in 1..{len(y) - 1} for digits, got {test_size}")
    return TaskData(x[:-test_size], y[:-test_size], x[-test_size:], y[-test_size:], tuple(DIGITS_CLASSES), "sklearn-digits")


def load_cifar10(source: str, path: str) -> TaskData:
    p = Path(path).expanduser() if path else None
    if source == "auto":
        if p is None:
            source = "flwr-datasets"
        elif p.suffix == ".npz":
            source = "npz"
        else:
            source = "folder"
    if source == "npz":
        return _cifar_from_npz(_require(p, source))
    if source == "folder":
        return _cifar_from_folder(_require(p, source))
    return _cifar_from_flwr_datasets()


def _require(p: Path | None, source: str) -> Path:
    if p is None or not p.exists():
        raise ConfigError(f"run-config key 'dataset-path' must point at an existing {source} for dataset-source={source}, got {p}")
    return p


def _as_nhwc_uint8(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ConfigError(f"{what}: images must be [N,H,W,C] (or [N,C,H,W]) with C in (1,3), got {x.shape}")
    return np.ascontiguousarray(x.astype(np.uint8))


def _cifar_from_npz(p: Path) -> TaskData:
    with np.load(p, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise ConfigError(f"run-config key 'dataset-path': {p} lacks arrays {missing} (needs x_train, y_train, x_test, y_test)")
        names = tuple(str(c) for c in z["class_names"]) if "class_names" in z.files else tuple(CIFAR10_CLASSES)
        data = TaskData(
            _as_nhwc_uint8(z["x_train"], str(p)),
            z["y_train"].astype(np.int64).ravel(),
            _as_nhwc_uint8(z["x_test"], str(p)),
            z["y_test"].astype(np.int64).ravel(),
            names,
            f"npz:{p.resolve()}",
        )
    log.info("Loaded CIFAR-10 from %s: %d train / %d test", p, len(data.y_train), len(data.y_test))
    return data


def _cifar_from_folder(p: Path) -> TaskData:
    root = p if (p / "data_batch_1").exists() else p / "cifar-10-batches-py"
    if not (root / "data_batch_1").exists():
        raise ConfigError(
            f"run-config key 'dataset-path': {p} is not a torchvision-style CIFAR-10 folder "
            "(expected cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta)"
        )

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(root / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), np.asarray(d["labels"], dtype=np.int64)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read("test_batch")
    names = tuple(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as f:
            names = tuple(pickle.load(f, encoding="latin1")["label_names"])
    return TaskData(
        np.concatenate([x for x, _ in parts]),
        np.concatenate([y for _, y in parts]),
        x_test,
        y_test,
        names,
        f"folder:{root.resolve()}",
    )


def _cifar_from_flwr_datasets() -> TaskData:
    try:
        from flwr_datasets import FederatedDataset

        fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": 1})
        train, test = fds.load_split("train"), fds.load_split("test")
    except Exception as err:  # network or hub failure
        raise ConfigError(
            "could not load uoft-cs/cifar10 through flwr-datasets (offline?): set run-config keys "
            "'dataset-source' to \"npz\" or \"folder\" and 'dataset-path' to a local copy"
            f" ({type(err).__name__}: {err})"
        ) from err

    def to_np(split) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in split["img"]])
        return x, np.asarray(split["label"], dtype=np.int64)

    x_train, y_train = to_np(train)
    x_test, y_test = to_np(test)
    return TaskData(x_train, y_train, x_test, y_test, tuple(CIFAR10_CLASSES), "flwr-datasets:uoft-cs/cifar10")
