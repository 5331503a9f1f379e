"""Dataset sources on tiny generated files: .npz and a torchvision-style ``cifar-10-batches-py`` folder."""

import pickle

import numpy as np
import pytest

from fltask.config import ConfigError, parse_run_config
from fltask.datasets import CIFAR10_CLASSES, DIGITS_CLASSES, load_cifar10, load_digits, load_task_data


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_npz_source_loads_nhwc_uint8_and_labels(tmp_path):
    x_train, x_test = _images(12, 0), _images(4, 1)
    y_train, y_test = np.arange(12) % 10, np.array([3, 1, 4, 1])
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test, y_test=y_test)
    cfg = parse_run_config({"dataset": "cifar10", "dataset-source": "npz", "dataset-path": str(path)})
    data = load_task_data(cfg)
    np.testing.assert_array_equal(data.x_train, x_train)
    np.testing.assert_array_equal(data.x_test, x_test)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    np.testing.assert_array_equal(data.y_train, y_train)
    assert data.class_names == tuple(CIFAR10_CLASSES) and data.num_classes == 10
    assert data.image_shape == (32, 32, 3)
    assert load_cifar10("auto", str(path)).source.startswith("npz:")  # auto picks npz by suffix


def test_npz_source_accepts_nchw_and_class_names(tmp_path):
    x = _images(6, 2)
    path = tmp_path / "nchw.npz"
    names = np.array([f"c{i}" for i in range(10)])
    np.savez(path, x_train=x.transpose(0, 3, 1, 2), y_train=np.arange(6), x_test=x.transpose(0, 3, 1, 2)[:2],
             y_test=np.arange(2), class_names=names)
    data = load_cifar10("npz", str(path))
    np.testing.assert_array_equal(data.x_train, x)
    assert data.class_names == tuple(names)


def test_npz_missing_arrays_names_them(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=_images(2, 0), y_train=np.arange(2))
    with pytest.raises(ConfigError, match="x_test.*y_test"):
        load_cifar10("npz", str(path))


def _write_cifar_folder(root, per_batch=3):
    """torchvision layout: pickled dicts with 'data' uint8 [N, 3072] (CHW rows) and 'labels'; batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x = _images(per_batch, 10 + b)
        y = [(b + k) % 10 for k in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
                         "labels": y, "filenames": [f"{name}_{k}.png" for k in range(per_batch)]}, f)
        images.append(x)
        labels.append(y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"name{i}" for i in range(10)], "num_vis": 3072}, f)
    return folder, images, labels


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_folder_source_reads_torchvision_batches(tmp_path, point_at):
    folder, images, labels = _write_cifar_folder(tmp_path)
    path = tmp_path if point_at == "parent" else folder
    cfg = parse_run_config({"dataset": "cifar10", "dataset-source": "folder", "dataset-path": str(path)})
    data = load_task_data(cfg)
    np.testing.assert_array_equal(data.x_train, np.concatenate(images[:5]))  # pixel layout HWC, batches in order
    np.testing.assert_array_equal(data.y_train, np.concatenate(labels[:5]))
    np.testing.assert_array_equal(data.x_test, images[5])
    np.testing.assert_array_equal(data.y_test, labels[5])
    assert data.y_train.dtype == np.int64 and data.x_train.dtype == np.uint8
    assert data.class_names == tuple(f"name{i}" for i in range(10))  # from batches.meta


def test_folder_source_rejects_a_folder_without_batches(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="'dataset-path'.*cifar-10-batches-py"):
        load_cifar10("folder", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="'dataset-path'"):
        load_cifar10("folder", str(tmp_path / "absent"))


def test_digits_is_the_offline_default():
    data = load_digits(test_size=360)
    assert data.x_train.shape == (1437, 8, 8, 1) and data.x_train.dtype == np.uint8
    assert data.x_train.max() == 255 and data.x_train.min() == 0
    assert data.class_names == tuple(DIGITS_CLASSES)
    assert sorted(np.unique(data.y_test).tolist()) == list(range(10))
    again = load_digits(test_size=360)
    np.testing.assert_array_equal(again.x_test, data.x_test)  # fixed split, never the run seed
    with pytest.raises(ConfigError, match="'test-size'"):
        load_digits(test_size=5000)
