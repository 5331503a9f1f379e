"""Held-out split, long tail and client partitions: disjoint, complete, seeded, skewed as configured."""

from dataclasses import replace

import numpy as np
import pytest

from fltask.config import parse_run_config
from fltask.datasets import TaskData, load_digits, load_task_data
from fltask.partition import (
    dirichlet_partition,
    heldout_split,
    iid_partition,
    long_tail,
    long_tail_counts,
    make_split,
)


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_task_data(parse_run_config({}))


def _label_entropy(labels: np.ndarray, parts) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    out = []
    for p in parts:
        c = np.bincount(labels[p], minlength=10)
        q = c[c > 0] / c.sum()
        out.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(out))


def _assert_pairwise_disjoint(parts) -> None:
    seen: set[int] = set()
    for p in parts:
        s = set(p.tolist())
        assert len(s) == len(p), "a partition repeats an index"
        assert not (s & seen), "two partitions share an index"
        seen |= s


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_split_is_disjoint_and_complete(digits, partition):
    cfg = parse_run_config({"partition": partition, "num-clients": 10, "heldout-size": 300})
    split = make_split(cfg, digits)
    n = len(digits.y_train)
    _assert_pairwise_disjoint(list(split.partitions) + [split.heldout])
    assert len(split.heldout) == 300
    # class-balanced held-out split: 30 images of each digit
    assert np.bincount(digits.y_train[split.heldout], minlength=10).tolist() == [30] * 10
    # the partitions cover exactly the pool, and pool + held-out is the whole training set
    union = np.sort(np.concatenate(split.partitions))
    np.testing.assert_array_equal(union, np.sort(split.pool))
    np.testing.assert_array_equal(np.sort(np.concatenate([split.pool, split.heldout])), np.arange(n))
    assert all(len(p) > 0 for p in split.partitions)


def test_digits_train_and_test_are_disjoint_rows_of_the_dataset():
    """Train (hence every partition and the held-out split) and test are a split of sklearn digits."""
    from sklearn.datasets import load_digits as sk_digits

    data = load_digits(test_size=360)
    assert len(data.y_test) == 360 and len(data.y_train) == 1797 - 360
    sk = sk_digits()
    want = np.clip(np.rint(sk.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]

    def rows(x, y):  # each (image, label) as a hashable row, so duplicates are counted
        return sorted(xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y))

    got = rows(np.concatenate([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test]))
    assert got == rows(want, sk.target)  # every image used exactly once across train + test


def test_heldout_split_does_not_depend_on_run_seed(digits):
    a = make_split(parse_run_config({"seed": 0}), digits)
    b = make_split(parse_run_config({"seed": 5}), digits)
    np.testing.assert_array_equal(a.heldout, b.heldout)
    assert any(not np.array_equal(p, q) for p, q in zip(a.partitions, b.partitions))


@pytest.mark.parametrize("fn", ["dirichlet", "iid"])
def test_partitions_are_reproducible_and_seeded(digits, fn):
    _, pool = heldout_split(digits.y_train, 300)

    def parts(seed):
        if fn == "iid":
            return iid_partition(pool, 10, seed)
        return dirichlet_partition(digits.y_train, pool, 10, 0.5, seed, 10)

    a, b, c = parts(0), parts(0), parts(1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_dirichlet_skew_grows_as_alpha_falls(digits):
    _, pool = heldout_split(digits.y_train, 300)
    ent = {a: _label_entropy(digits.y_train, dirichlet_partition(digits.y_train, pool, 10, a, 0, 10))
           for a in (0.1, 1.0, 10.0)}
    assert ent[0.1] < ent[1.0] < ent[10.0]
    assert ent[0.1] < 0.6 * np.log(10)  # strongly skewed
    assert ent[10.0] > 0.9 * np.log(10)  # close to uniform


def test_iid_partitions_are_balanced(digits):
    _, pool = heldout_split(digits.y_train, 300)
    parts = iid_partition(pool, 10, 0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.all(np.bincount(digits.y_train[p], minlength=10) > 0) for p in parts)
    assert _label_entropy(digits.y_train, parts) > 0.95 * np.log(10)


def test_max_train_per_client_caps_every_partition(digits):
    split = make_split(parse_run_config({"max-train-per-client": 40}), digits)
    assert all(len(p) <= 40 for p in split.partitions)
    _assert_pairwise_disjoint(list(split.partitions) + [split.heldout])


def test_long_tail_counts_follow_the_profile():
    counts = long_tail_counts(10, 500, 100.0)
    assert counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    # n_c = floor(n_max * r^(-c/(C-1)))
    assert counts == [int(np.floor(500 * 100.0 ** (-c / 9))) for c in range(10)]

    labels = np.repeat(np.arange(10), 500)
    kept = long_tail(labels, np.arange(len(labels)), 100.0, seed=0)
    assert np.bincount(labels[kept], minlength=10).tolist() == counts
    assert len(np.unique(kept)) == len(kept)


def test_cifar10_lt_split_applies_the_tail_after_heldout_and_keeps_test_balanced():
    per_class = 200
    y_train = np.repeat(np.arange(10), per_class).astype(np.int64)
    y_test = np.repeat(np.arange(10), 5).astype(np.int64)
    data = TaskData(np.zeros((len(y_train), 2, 2, 3), np.uint8), y_train, np.zeros((50, 2, 2, 3), np.uint8), y_test,
                    tuple(str(i) for i in range(10)), "synthetic")
    cfg = parse_run_config({"dataset": "cifar10-lt", "lt-imbalance": 10.0, "heldout-size": 100,
                            "partition": "iid", "num-clients": 5})
    split = make_split(cfg, data)
    # held-out takes 10 per class first; the tail is cut from the remaining 190 per class
    assert np.bincount(y_train[split.heldout], minlength=10).tolist() == [10] * 10
    assert np.bincount(y_train[split.pool], minlength=10).tolist() == long_tail_counts(10, per_class - 10, 10.0)
    np.testing.assert_array_equal(np.sort(np.concatenate(split.partitions)), np.sort(split.pool))
    _assert_pairwise_disjoint(list(split.partitions) + [split.heldout])
    assert np.bincount(data.y_test).tolist() == [5] * 10  # the test set is never long-tailed

    balanced = make_split(replace(cfg, dataset="cifar10"), data)
    assert len(balanced.pool) == 10 * (per_class - 10)
