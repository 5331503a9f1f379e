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


# --------------------------------------------------------------------------- the core's choices


def _defense(model, n_clean=8, seed=0):
    import numpy as np

    from clipfed_strategy.config import CLIPFedConfig
    from clipfed_strategy.core import CLIPFedDefense
    from clipfed_strategy.server_dataset import ServerDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n_clean) % 4
    src = np.concatenate([np.arange(n_clean), np.arange(n_clean)])
    sds = ServerDataset(rng.integers(0, 256, (2 * n_clean, 6, 6, 3), dtype=np.uint8), labels[src],
                        np.repeat([0, 1], n_clean), src, ["a", "b", "c", "d"], ["clean", "aug"])
    n = len(sds)
    return CLIPFedDefense(model, sds, rng.standard_normal((n, 4)).astype(np.float32),
                          rng.standard_normal((n, 16)).astype(np.float32),
                          rng.standard_normal((4, 16)).astype(np.float32), {}, CLIPFedConfig(device="cpu"))


def _conv4():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


class _ViewNet4(_ViewNet):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 6 * 6, 4)


def test_core_keeps_server_images_channels_last_only_when_the_model_takes_them():
    d = _defense(_conv4())
    assert d.x.is_contiguous(memory_format=torch.channels_last) and not d.x.is_contiguous()
    assert _defense(_ViewNet4()).x.is_contiguous()  # .view on a conv output: NCHW kept
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    assert _defense(mlp).x.is_contiguous()  # no convolution: nothing to gain


@torch.no_grad()
def test_core_auto_and_vmap_give_the_same_logits_and_decisions():
    import numpy as np

    from clipfed_strategy.core import ClientUpdate

    models = _models(_conv4, 5)
    d = _defense(_conv4())
    states = [{k: v.numpy().copy() for k, v in m.state_dict().items()} for m in models]
    x_nchw = d.x.contiguous()
    ref = torch.stack([m(x_nchw) for m in models])
    logits_auto, _ = d.client_logits(states, need_features=False)
    d.eval_method = "vmap"
    logits_vmap, _ = d.client_logits(states, need_features=False)
    assert torch.allclose(logits_auto, ref, atol=1e-5) and torch.allclose(logits_vmap, ref, atol=1e-5)
    updates = [ClientUpdate(str(i), s, 10.0) for i, s in enumerate(states)]
    g = {k: np.zeros_like(v) for k, v in states[0].items()}
    out_vmap = d.screen(1, g, updates)
    d.eval_method = "auto"
    out_auto = d.screen(1, g, updates)
    assert out_auto.weights == out_vmap.weights and out_auto.flagged == out_vmap.flagged
    assert [r.get("score") for r in out_auto.records] == pytest.approx([r.get("score") for r in out_vmap.records])
