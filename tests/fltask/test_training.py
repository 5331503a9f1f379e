"""Local training: a poisoned client really implants the backdoor; a benign one does not; PGD holds the radius."""

import copy

import numpy as np
import pytest
import torch

from fltask.attacks import TriggerSpec
from fltask.config import parse_run_config
from fltask.datasets import load_task_data
from fltask.models import build_model
from fltask.partition import make_split
from fltask.training import Poisoning, attack_success_rate, main_accuracy, predict, to_tensor, train_local


@pytest.fixture(scope="module")
def setup():
    """Default digits federation; a 'global model' after 2 benign epochs on the pool, as after a few rounds."""
    cfg = parse_run_config({})
    data = load_task_data(cfg)
    split = make_split(cfg, data)
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 8)
    pool_x, pool_y = to_tensor(data.x_train[split.pool]), torch.from_numpy(data.y_train[split.pool])
    train_local(model, pool_x, pool_y, epochs=2, lr=0.05, batch_size=32, seed=0)
    test = to_tensor(data.x_test), torch.from_numpy(data.y_test)
    idx = split.partitions[4]
    client = to_tensor(data.x_train[idx]), torch.from_numpy(data.y_train[idx])
    return cfg, model, client, test, TriggerSpec.from_config(cfg, 8)


def test_to_tensor_is_nchw_unit_range():
    imgs = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    x = to_tensor(imgs)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[1, 2, 3, 4].item() == pytest.approx(imgs[1, 3, 4, 2] / 255.0)


def test_malicious_local_model_carries_the_backdoor_and_benign_does_not(setup):
    cfg, global_model, (x, y), (xt, yt), spec = setup
    assert attack_success_rate(global_model, xt, yt, spec) < 0.1  # no backdoor before local training
    kw = dict(epochs=10, lr=0.02, batch_size=32, seed=1)

    bad = copy.deepcopy(global_model)
    loss = train_local(bad, x, y, poisoning=Poisoning(spec, 0.2), **kw)
    good = copy.deepcopy(global_model)
    train_local(good, x, y, **kw)

    assert loss == loss and loss > 0
    assert attack_success_rate(bad, xt, yt, spec) >= 0.8
    assert attack_success_rate(good, xt, yt, spec) <= 0.2
    # a backdoor, not a collapse onto the target: clean non-target images are not sent to the target ...
    clean = yt != spec.target
    assert (predict(bad, xt[clean]) == spec.target).float().mean() <= 0.2
    # ... and the malicious model still does the main task
    assert main_accuracy(bad, xt, yt) >= 0.6


def test_pgd_keeps_the_trained_update_within_the_radius(setup):
    _, global_model, (x, y), _, spec = setup
    start = {k: v.clone() for k, v in global_model.state_dict().items()}

    def update_norm(m):
        s = m.state_dict()
        return torch.sqrt(sum(((s[k] - start[k]) ** 2).sum() for k, v in s.items() if v.is_floating_point())).item()

    free = copy.deepcopy(global_model)
    train_local(free, x, y, epochs=2, lr=0.05, batch_size=32, poisoning=Poisoning(spec, 0.5))
    constrained = copy.deepcopy(global_model)
    train_local(constrained, x, y, epochs=2, lr=0.05, batch_size=32, poisoning=Poisoning(spec, 0.5, pgd_radius=0.3))
    assert update_norm(free) > 0.3  # the constraint binds
    assert update_norm(constrained) <= 0.3 * (1 + 1e-4)


def test_training_is_seeded(setup):
    _, global_model, (x, y), _, spec = setup
    runs = []
    for _ in range(2):
        m = copy.deepcopy(global_model)
        train_local(m, x, y, epochs=1, lr=0.05, batch_size=32, seed=3, poisoning=Poisoning(spec, 0.5))
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
