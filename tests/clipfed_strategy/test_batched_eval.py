"""vmap evaluation of K client models equals one-model-at-a-time evaluation."""

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

from clipfed_strategy.batched_eval import (
    StackError,
    batched_logits_and_features,
    looped_logits_and_features,
    stack_states,
)


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 10),
    )


def _perturbed(make, k, seed=0):
    """k models of one architecture with different weights and BatchNorm running statistics."""
    torch.manual_seed(seed)
    models = []
    for _ in range(k):
        m = make()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        models.append(m)
    return models


@torch.no_grad()
def _reference(models, x, feature_of):
    logits, feats = [], []
    for m in models:
        m = copy.deepcopy(m).eval()
        logits.append(m(x))
        feats.append(feature_of(m, x))
    return torch.stack(logits), torch.stack(feats)


def test_stack_states_shapes_and_errors():
    models = _perturbed(_cnn, 3)
    st = stack_states([m.state_dict() for m in models])
    assert st["0.weight"].shape == (3, 6, 1, 3, 3)
    assert st["1.num_batches_tracked"].shape == (3,)
    assert torch.equal(st["7.bias"][1], models[1][7].bias)
    with pytest.raises(StackError):
        stack_states([])
    bad = dict(models[1].state_dict())
    bad.pop("7.bias")
    with pytest.raises(StackError, match="different keys"):
        stack_states([models[0].state_dict(), bad])
    other = nn.Sequential(*list(_cnn())[:-1], nn.Linear(16, 3)).state_dict()
    with pytest.raises(StackError, match="shape"):
        stack_states([models[0].state_dict(), other])


def test_batched_equals_looped_equals_reference_sequential():
    models = _perturbed(_cnn, 5)
    template = _cnn().train()
    st = stack_states([m.state_dict() for m in models])
    x = torch.rand(37, 1, 8, 8)
    lb, fb = batched_logits_and_features(template, st, x, chunk_size=2, batch_size=16)
    ll, fl = looped_logits_and_features(template, st, x, batch_size=16)
    lr, fr = _reference(models, x, lambda m, xb: m[:6](xb))
    assert lb.shape == (5, 37, 10) and fb.shape == (5, 37, 16)
    assert torch.allclose(lb, ll, atol=1e-5) and torch.allclose(fb, fl, atol=1e-5)
    assert torch.allclose(lb, lr, atol=1e-5) and torch.allclose(fb, fr, atol=1e-5)
    assert template.training  # flags restored; dropout was off during evaluation (deterministic)
    logits_only, none = batched_logits_and_features(template, st, x, return_features=False)
    assert none is None and torch.allclose(logits_only, lb, atol=1e-5)


def test_batched_equals_reference_resnet18():
    make = lambda: torchvision.models.resnet18(num_classes=10)  # noqa: E731
    models = _perturbed(make, 3, seed=1)
    st = stack_states([m.state_dict() for m in models])
    x = torch.rand(4, 3, 16, 16)

    def penultimate(m, xb):
        h = m.maxpool(m.relu(m.bn1(m.conv1(xb))))
        return torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(h))))), 1)

    lb, fb = batched_logits_and_features(make(), st, x, chunk_size=2)
    lr, fr = _reference(models, x, penultimate)
    assert fb.shape == (3, 4, 512)
    assert torch.allclose(lb, lr, atol=1e-4) and torch.allclose(fb, fr, atol=1e-4)


class _DataDependent(nn.Module):
    """Python control flow on a tensor value: not vmappable."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        if h.sum().item() > 0:
            h = h * 2
        return self.fc2(h)


def test_falls_back_to_loop_with_warning(caplog):
    torch.manual_seed(0)
    models = [_DataDependent() for _ in range(3)]
    st = stack_states([m.state_dict() for m in models])
    x = torch.rand(6, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="clipfed_strategy.batched_eval"):
        lb, fb = batched_logits_and_features(_DataDependent(), st, x)
    assert any("falling back" in r.getMessage() for r in caplog.records)
    lr, fr = _reference(models, x, lambda m, xb: 2 * torch.relu(m.fc1(xb.flatten(1))))
    assert torch.allclose(lb, lr, atol=1e-5) and torch.allclose(fb, fr, atol=1e-5)


def test_named_feature_module():
    models = _perturbed(_cnn, 2)
    st = stack_states([m.state_dict() for m in models])
    x = torch.rand(3, 1, 8, 8)
    _, feats = batched_logits_and_features(_cnn(), st, x, feature_module="2")
    _, ref = _reference(models, x, lambda m, xb: m[:3](xb).flatten(1))
    assert feats.shape == (2, 3, 6 * 8 * 8)
    assert torch.allclose(feats, ref, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_equals_looped_on_cuda():
    models = _perturbed(_cnn, 4)
    st = stack_states([m.state_dict() for m in models], device="cuda")
    x = torch.rand(50, 1, 8, 8, device="cuda")
    template = _cnn().cuda()
    lb, fb = batched_logits_and_features(template, st, x, chunk_size=3, batch_size=20)
    ll, fl = looped_logits_and_features(template, st, x)
    assert lb.device.type == "cuda"
    assert torch.allclose(lb, ll, atol=1e-4) and torch.allclose(fb, fl, atol=1e-4)
