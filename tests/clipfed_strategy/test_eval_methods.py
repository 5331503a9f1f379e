"""Fast paths of client-model evaluation: method selection, per-model lists, channels-last inputs on CPU."""

import logging

import pytest
import torch
from torch import nn

from clipfed_strategy.batched_eval import (
    StackError,
    batched_logits_and_features,
    looped_logits_and_features,
    resolve_method,
    stack_states,
)


class _ViewNet(nn.Module):
    """A conv net that calls ``.view`` on a conv output: fails on channels-last activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def _conv():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))


def _models(make, k):
    torch.manual_seed(0)
    out = []
    for _ in range(k):
        m = make()
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3)
        out.append(m.eval())
    return out


def test_resolve_method():
    assert resolve_method("auto", "cpu") == "sequential"
    assert resolve_method("auto", torch.device("cuda", 0)) == "vmap"
    assert resolve_method("vmap", "cpu") == "vmap"
    assert resolve_method("sequential", "cuda") == "sequential"
    with pytest.raises(ValueError, match="allowed values: vmap, sequential, auto"):
        resolve_method("fast", "cpu")


@torch.no_grad()
def test_all_paths_agree_with_plain_forward():
    models = _models(_conv, 3)
    x = torch.rand(11, 3, 6, 6)
    ref = torch.stack([m(x) for m in models])
    ref_feats = torch.stack([m[:7](x) for m in models])
    st = stack_states([m.state_dict() for m in models])
    runs = {
        "vmap": batched_logits_and_features(_conv(), st, x, chunk_size=2, batch_size=4),
        "auto": batched_logits_and_features(_conv(), st, x, batch_size=4, method="auto"),
        "loop_stacked": looped_logits_and_features(_conv(), st, x, batch_size=4),
        "loop_list": looped_logits_and_features(_conv(), [m.state_dict() for m in models], x, batch_size=4),
    }
    for name, (logits, feats) in runs.items():
        assert torch.allclose(logits, ref, atol=1e-5), name
        assert torch.allclose(feats, ref_feats, atol=1e-5), name
        assert torch.equal(logits.argmax(-1), ref.argmax(-1)), name
        assert logits.is_contiguous()
    # a list and a stack of the same models give the very same numbers (same code path)
    assert torch.equal(runs["loop_list"][0], runs["loop_stacked"][0])
    assert torch.equal(runs["auto"][0], runs["loop_stacked"][0])


@torch.no_grad()
def test_channels_last_fallback_for_models_that_view(caplog):
    models = _models(_ViewNet, 2)
    x = torch.rand(5, 3, 6, 6)
    ref = torch.stack([m(x) for m in models])
    with caplog.at_level(logging.INFO, logger="clipfed_strategy.batched_eval"):
        logits, feats = looped_logits_and_features(_ViewNet(), [m.state_dict() for m in models], x)
    assert torch.allclose(logits, ref, atol=1e-5)
    assert feats.shape == (2, 5, 4 * 6 * 6)
    assert any("channels-last" in r.getMessage() for r in caplog.records)


def test_looped_input_errors():
    with pytest.raises(StackError, match="no client models"):
        looped_logits_and_features(_conv(), [], torch.rand(2, 3, 6, 6))
    with pytest.raises(ValueError, match="batch_size"):
        looped_logits_and_features(_conv(), [_conv().state_dict()], torch.rand(2, 3, 6, 6), batch_size=0)
    with pytest.raises(ValueError, match="allowed values"):
        batched_logits_and_features(_conv(), stack_states([_conv().state_dict()]), torch.rand(2, 3, 6, 6),
                                    method="nope")
