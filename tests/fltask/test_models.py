"""Models: logits of the right shape for grey 8x8 and RGB 32x32 inputs; penultimate features feed ``fc``."""

import pytest
import torch

from fltask.models import build_model


@pytest.mark.parametrize("name", ["cnn", "resnet8", "resnet18"])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_models_expose_penultimate_features(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 10, size).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert logits.shape == (2, 10)
    assert feats.shape == (2, model.fc.in_features)
    torch.testing.assert_close(model.fc(feats), logits)


def test_unknown_model_names_allowed_values():
    with pytest.raises(ValueError, match="cnn, resnet8, resnet18"):
        build_model("vgg", 3, 10, 32)
