"""PenultimateExtractor on torchvision ResNet-18 and on a plain Sequential CNN."""

import pytest
import torch
import torchvision
from torch import nn

from clipfed_strategy.features import FeatureModuleError, PenultimateExtractor, eval_mode, last_linear


def _seq_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 12),
        nn.ReLU(),
        nn.Linear(12, 10),
    )


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_resnet18_default_is_input_of_fc(resnet):
    x = torch.rand(3, 3, 16, 16)
    ext = PenultimateExtractor(resnet)
    assert ext.hooked_name == "fc" and ext.feature_dim == 512
    with torch.no_grad():
        logits, feats = ext(x)
        m = resnet
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        want = torch.flatten(m.avgpool(h), 1)
        assert torch.allclose(logits, resnet(x), atol=1e-6)
    assert feats.shape == (3, 512)
    assert torch.allclose(feats, want, atol=1e-5)
    assert torch.allclose(resnet.fc(feats), logits, atol=1e-5)


def test_resnet18_named_module_is_flattened_output(resnet):
    x = torch.rand(2, 3, 16, 16)
    ext = PenultimateExtractor(resnet, "avgpool")
    with pytest.raises(FeatureModuleError, match="after one forward"):
        _ = ext.feature_dim
    with torch.no_grad():
        _, by_name = ext(x)
        _, by_linear = PenultimateExtractor(resnet)(x)
    assert ext.feature_dim == 512
    assert torch.allclose(by_name, by_linear)
    with torch.no_grad():
        _, mid = PenultimateExtractor(resnet, "layer3.1.bn2")(x)
    assert mid.shape == (2, 256 * 1 * 1)  # 16x16 input -> 1x1 at layer3


def test_missing_module_lists_valid_names(resnet):
    with pytest.raises(FeatureModuleError) as err:
        PenultimateExtractor(resnet, "layer4.avgpol")
    assert "layer4" in str(err.value) and "valid names" in str(err.value)
    with pytest.raises(ValueError):  # FeatureModuleError is a ValueError
        PenultimateExtractor(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))


def test_sequential_default_and_hooks_removed():
    torch.manual_seed(0)
    model = _seq_cnn()
    x = torch.rand(5, 1, 8, 8)
    ext = PenultimateExtractor(model)
    assert ext.hooked_name == "5" and ext.feature_dim == 12
    logits, feats = ext(x)
    assert torch.allclose(feats, model[:5](x))
    assert torch.allclose(logits, model(x))
    assert feats.requires_grad  # usable for training (distillation)
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    _, named = PenultimateExtractor(model, "4")(x)
    assert torch.allclose(named, feats)


def test_last_linear_follows_module_order_and_functional_call():
    model = _seq_cnn()
    name, lin = last_linear(model)
    assert name == "5" and lin is model[5]
    ext = PenultimateExtractor(model)
    other = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 8, 8)
    logits, feats = ext.functional(other, x)
    ref = _seq_cnn()
    ref.load_state_dict(other)
    assert torch.allclose(logits, ref(x), atol=1e-5)
    assert torch.allclose(feats, ref[:5](x), atol=1e-5)


def test_eval_mode_restores_flags():
    model = _seq_cnn().train()
    model[0].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[0].training and model[3].training
