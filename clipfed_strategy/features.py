"""Penultimate features of an arbitrary classifier, without changing the classifier.

CLIP-Fed needs φ_θ(x), the representation just before the classification layer, both to score
client models (prototype deviation, method.md §5) and to align the global model with CLIP's text
prototypes (prototype contrastive loss, §6). The FL model is any user ``nn.Module`` mapping float
NCHW images in [0, 1] to logits, so the features are captured with a hook:

* by default, the *input* of the last ``nn.Linear`` in ``model.modules()`` order (the classifier
  of torchvision ResNets, VGG heads, most ``nn.Sequential`` CNNs);
* or the *output* of a named module (``module_name``, dotted path as in ``model.named_modules()``).

Hooks are registered only for the duration of one forward call, so the user's model is never left
modified, and the capture also works inside ``torch.func.functional_call`` and ``torch.vmap``.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class FeatureModuleError(ValueError):
    """The module to take features from cannot be found."""


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` in ``model.named_modules()`` order.

    Raises
    ------
    FeatureModuleError
        If the model holds no ``nn.Linear``.
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise FeatureModuleError(
            f"{type(model).__name__} has no nn.Linear layer, so its penultimate features cannot be "
            f"found automatically; pass feature_module=<name> (e.g. one of "
            f"{_some_names(model)})"
        )
    return found


def _some_names(model: nn.Module, near: str | None = None, limit: int = 8) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if near:
        close = difflib.get_close_matches(near, names, n=limit, cutoff=0.3)
        if close:
            return close
    return names[-limit:]


def find_module(model: nn.Module, module_name: str) -> nn.Module:
    """The sub-module called ``module_name`` (dotted path), with a helpful error if it is missing."""
    modules = dict(model.named_modules())
    if module_name not in modules or not module_name:
        raise FeatureModuleError(
            f"feature_module={module_name!r} is not a module of {type(model).__name__}; "
            f"valid names include {_some_names(model, module_name)}"
        )
    return modules[module_name]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for a ``with`` block; every sub-module's flag is restored after."""
    flags = [m.training for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in zip(module.modules(), flags):
            m.training = flag


class PenultimateExtractor(nn.Module):
    """Wrap a classifier so that one forward pass returns ``(logits, features)``.

    Parameters
    ----------
    model : nn.Module
        Any classifier mapping ``[N, C, H, W]`` float images in [0, 1] to logits ``[N, classes]``.
        It is wrapped, not copied: training the extractor trains the model.
    module_name : str or None, default None
        ``None``: features are the input of the last ``nn.Linear`` in ``model.modules()`` order.
        Otherwise the dotted name of a module whose *output* is taken as the features.

    Notes
    -----
    Features are flattened to ``[N, d]`` (e.g. the ``[N, 512, 1, 1]`` output of ResNet's
    ``avgpool`` becomes ``[N, 512]``). If the hooked module runs more than once per forward pass,
    the last call wins.
    """

    def __init__(self, model: nn.Module, module_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.module_name = module_name
        if module_name is None:
            self.hooked_name, self._target = last_linear(model)
            self._use_input = True
            self._feature_dim: int | None = self._target.in_features
        else:
            self.hooked_name, self._target = module_name, find_module(model, module_name)
            self._use_input = False
            self._feature_dim = None

    @property
    def feature_dim(self) -> int:
        """Width d of the features (known up front for the last-Linear default, else after a forward)."""
        if self._feature_dim is None:
            raise FeatureModuleError(
                f"the width of the output of {self.hooked_name!r} is known only after one forward "
                "pass; call the extractor once (e.g. on a single input) first"
            )
        return self._feature_dim

    @contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Register the hook for the duration of a ``with`` block; yields the list it appends to."""
        store: list[Tensor] = []
        if self._use_input:
            handle = self._target.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
        else:
            handle = self._target.register_forward_hook(lambda _m, _a, out: store.append(out))
        try:
            yield store
        finally:
            handle.remove()

    def _features(self, store: list[Tensor]) -> Tensor:
        if not store:
            raise FeatureModuleError(
                f"module {self.hooked_name!r} did not run during the forward pass; pass another "
                "feature_module"
            )
        feats = store[-1]
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        feats = feats.flatten(1) if feats.dim() > 2 else feats
        if self._feature_dim is None:
            self._feature_dim = int(feats.shape[-1])
        return feats

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(logits [N, classes], features [N, d])`` from one forward pass of the model."""
        with self.capture() as store:
            logits = self.model(x)
        return logits, self._features(store)

    def functional(self, params_and_buffers: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`forward` with the model's tensors replaced (``torch.func.functional_call``).

        ``params_and_buffers`` uses the model's own state-dict names (no ``model.`` prefix).
        """
        with self.capture() as store:
            logits = torch.func.functional_call(self.model, params_and_buffers, (x,))
        return logits, self._features(store)
