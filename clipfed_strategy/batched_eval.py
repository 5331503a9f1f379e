"""Evaluate K client models of one architecture on the same inputs, all at once.

Screening (method.md §5) needs every client model's logits (and penultimate features) on the
server dataset. The K models differ only in their tensors, so the template module is run with
``torch.func.functional_call`` under ``torch.vmap`` over a stacked copy of the K state dicts: one
batched forward pass per chunk of models and batch of images instead of K separate passes. A plain
loop (:func:`looped_logits_and_features`) gives the same numbers; it is the reference in the tests
and the fallback when ``vmap`` cannot handle a model.

On CPU the loop is the fast path (``method="auto"``): one model's forward over a batch of 512
images already keeps the cores busy, and vmap turns every convolution after the first into a
grouped convolution over K·C channels, which oneDNN runs slower (``benchmarks/server_overhead.py``,
2 cores: vmap 1.2–2.6× the loop's time on the small CNN, 1.35× on ResNet-18). The loop also feeds
CPU convolution models channels-last inputs (about 2× faster for the small CNN, neutral for
ResNet-18; logits equal to ~1e-7) and needs no stacked copy of the K models.

On CPU the batch of images is also sized to the model (:func:`auto_batch_size`): glibc hands out
blocks above its mmap threshold (at most 32 MiB) as fresh pages, so a 512-image batch, whose
first convolution output is 64 MiB for the small CNN, page-faults on every layer of every model
(1.8 million faults for K=50 clients on 400 images, half the screening time). Batches whose
largest activation stays below 16 MiB reuse the heap and give the same logits.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from clipfed_strategy.features import PenultimateExtractor, eval_mode

logger = logging.getLogger(__name__)


class StackError(ValueError):
    """Client state dicts that cannot be stacked (different keys or shapes)."""


def stack_states(
    states: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """Stack K state dicts of one architecture into one dict of ``[K, ...]`` tensors.

    Parameters
    ----------
    states : sequence of mapping str -> Tensor
        The K client state dicts (same keys, same shapes).
    device : torch.device, str or None, default None
        Where to put the stacked tensors; ``None`` keeps each tensor's device.

    Raises
    ------
    StackError
        If the list is empty or the state dicts disagree on keys or shapes.
    """
    if len(states) == 0:
        raise StackError("stack_states needs at least one state dict")
    keys = list(states[0].keys())
    for i, sd in enumerate(states[1:], start=1):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))[:5]
            raise StackError(f"state dict {i} has different keys from state dict 0 (e.g. {diff})")
    out: dict[str, Tensor] = {}
    for key in keys:
        tensors = [torch.as_tensor(sd[key]) for sd in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise StackError(f"state dicts disagree on the shape of {key!r}: {sorted(shapes)}")
        stacked = torch.stack([t.detach() for t in tensors])
        out[key] = stacked.to(device) if device is not None else stacked
    return out


def _num_models(stacked: Mapping[str, Tensor]) -> int:
    sizes = {int(t.shape[0]) for t in stacked.values()}
    if len(sizes) != 1:
        raise StackError(f"stacked tensors disagree on the number of models: {sorted(sizes)}")
    return sizes.pop()


def _slice(stacked: Mapping[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    return {k: v[start:stop] for k, v in stacked.items()}


METHODS = ("vmap", "sequential", "auto")


def resolve_method(method: str, device: torch.device | str) -> str:
    """``"vmap"`` or ``"sequential"``: ``"auto"`` is vmap on accelerators and sequential on CPU.

    Raises
    ------
    ValueError
        If ``method`` is not one of ``"vmap"``, ``"sequential"``, ``"auto"``.
    """
    if method not in METHODS:
        raise ValueError(f"method is {method!r}; allowed values: {', '.join(METHODS)}")
    if method == "auto":
        return "sequential" if torch.device(device).type == "cpu" else "vmap"
    return method


VMAP_BATCH = 512
ACTIVATION_BUDGET = 16 * 2**20


def auto_batch_size(model: nn.Module, x: Tensor, budget_bytes: int = ACTIVATION_BUDGET, cap: int = VMAP_BATCH) -> int:
    """Images per forward pass on CPU: as many as keep the model's largest activation ≤ ``budget_bytes``.

    Parameters
    ----------
    model : nn.Module
        The classifier (one forward pass on a single image of ``x`` measures its module outputs).
    x : Tensor
        The inputs ``[N, ...]``; only ``x[:1]`` is run.
    budget_bytes : int, default 16 MiB
        Below glibc's largest mmap threshold (32 MiB), so activations reuse heap memory.
    cap : int, default 512

    Returns
    -------
    int
        Between 1 and ``cap``; ``cap`` on non-CPU devices or when the probe fails.
    """
    if x.device.type != "cpu" or x.shape[0] == 0:
        return cap
    largest = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x[:1].contiguous())
    except Exception:  # noqa: BLE001 - the real evaluation reports the error
        return cap
    finally:
        for h in handles:
            h.remove()
    return cap if largest == 0 else int(max(1, min(cap, budget_bytes // largest)))


def _channels_last_helps(model: nn.Module, x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _per_model(params: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]) -> list[Mapping[str, Tensor]]:
    """One mapping per model, from ``[K, ...]`` stacked tensors (views, no copy) or a list of state dicts."""
    if isinstance(params, Mapping):
        return [{name: t[k] for name, t in params.items()} for k in range(_num_models(params))]
    if len(params) == 0:
        raise StackError("no client models to evaluate")
    return list(params)


@torch.no_grad()
def looped_logits_and_features(
    model_template: nn.Module,
    stacked_params_and_buffers: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    x: Tensor,
    feature_module: str | None = None,
    batch_size: int | None = None,
    return_features: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Reference implementation of :func:`batched_logits_and_features`: one model at a time.

    Parameters are as in :func:`batched_logits_and_features` (no ``chunk_size``), except that
    ``stacked_params_and_buffers`` may also be a sequence of K state dicts (no stacked copy needed)
    and ``batch_size=None`` means :func:`auto_batch_size` (512 off CPU). On CPU, a model with
    ``nn.Conv2d`` layers gets channels-last inputs (faster oneDNN kernels); if the model cannot take
    them (e.g. it calls ``.view`` on a conv output), it runs on the contiguous inputs instead.
    """
    models = _per_model(stacked_params_and_buffers)
    if batch_size is None:
        batch_size = auto_batch_size(model_template, x)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if _channels_last_helps(model_template, x):
        try:
            return _loop(model_template, models, x.contiguous(memory_format=torch.channels_last),
                         feature_module, batch_size, return_features)
        except RuntimeError as exc:
            logger.info("channels-last inputs failed for %s (%s); evaluating contiguous inputs",
                        type(model_template).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return _loop(model_template, models, x, feature_module, batch_size, return_features)


def _loop(
    model_template: nn.Module,
    models: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    feature_module: str | None,
    batch_size: int,
    return_features: bool,
) -> tuple[Tensor, Tensor | None]:
    extractor = PenultimateExtractor(model_template, feature_module)
    all_logits, all_feats = [], []
    with eval_mode(model_template):
        for params in models:
            logits_k, feats_k = [], []
            for start in range(0, x.shape[0], batch_size):
                logits, feats = extractor.functional(params, x[start : start + batch_size])
                logits_k.append(logits)
                if return_features:
                    feats_k.append(feats)
            all_logits.append(torch.cat(logits_k))
            if return_features:
                all_feats.append(torch.cat(feats_k))
    feats_out = torch.stack(all_feats) if return_features else None
    return torch.stack(all_logits), feats_out


@torch.no_grad()
def _vmapped(
    extractor: PenultimateExtractor,
    stacked: Mapping[str, Tensor],
    x: Tensor,
    chunk_size: int,
    batch_size: int,
    return_features: bool,
) -> tuple[Tensor, Tensor | None]:
    k_models = _num_models(stacked)

    def one_model(params: dict[str, Tensor], xb: Tensor) -> tuple[Tensor, Tensor]:
        return extractor.functional(params, xb)

    over_models = torch.vmap(one_model, in_dims=(0, None))
    logits_chunks, feat_chunks = [], []
    for k0 in range(0, k_models, chunk_size):
        params = _slice(stacked, k0, k0 + chunk_size)
        logits_n, feats_n = [], []
        for n0 in range(0, x.shape[0], batch_size):
            logits, feats = over_models(params, x[n0 : n0 + batch_size])
            logits_n.append(logits)
            if return_features:
                feats_n.append(feats)
        logits_chunks.append(torch.cat(logits_n, dim=1))
        if return_features:
            feat_chunks.append(torch.cat(feats_n, dim=1))
    feats_out = torch.cat(feat_chunks) if return_features else None
    return torch.cat(logits_chunks), feats_out


def batched_logits_and_features(
    model_template: nn.Module,
    stacked_params_and_buffers: Mapping[str, Tensor],
    x: Tensor,
    chunk_size: int | None = None,
    feature_module: str | None = None,
    batch_size: int | None = None,
    return_features: bool = True,
    method: str = "vmap",
) -> tuple[Tensor, Tensor | None]:
    """Logits and penultimate features of K models of one architecture on the same inputs.

    Parameters
    ----------
    model_template : nn.Module
        A module of the clients' architecture; only its structure (and any tensor missing from
        ``stacked_params_and_buffers``) is used. It runs in eval mode; its flags are restored after.
    stacked_params_and_buffers : mapping str -> Tensor
        ``[K, ...]`` tensors named as in the template's ``state_dict()`` (see :func:`stack_states`),
        on the device of ``x``.
    x : Tensor
        Inputs ``[N, C, H, W]``, float in [0, 1], on the models' device.
    chunk_size : int or None, default None
        Models evaluated together in one vmapped call; ``None`` = all K. Lower it to fit memory.
    feature_module : str or None, default None
        Passed to :class:`~clipfed_strategy.features.PenultimateExtractor` (``None`` = input of
        the last ``nn.Linear``).
    batch_size : int or None, default None
        Images per forward pass; ``None`` = 512 with vmap, :func:`auto_batch_size` one model at a
        time on CPU.
    return_features : bool, default True
        ``False`` returns ``None`` for the features (saves memory when only logits are needed).
    method : {"vmap", "sequential", "auto"}, default "vmap"
        ``sequential`` runs :func:`looped_logits_and_features`; ``auto`` picks vmap on
        accelerators and sequential on CPU, where it is faster (module docstring).

    Returns
    -------
    logits : Tensor ``[K, N, classes]``
    features : Tensor ``[K, N, d]`` or None

    Notes
    -----
    If ``torch.vmap`` fails on the model (an unsupported op, data-dependent control flow), the
    function logs a WARNING and falls back to :func:`looped_logits_and_features`.
    """
    k_models = _num_models(stacked_params_and_buffers)
    chunk = k_models if chunk_size is None or chunk_size <= 0 else int(chunk_size)
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if resolve_method(method, x.device) == "sequential":
        return looped_logits_and_features(
            model_template, stacked_params_and_buffers, x, feature_module=feature_module,
            batch_size=batch_size, return_features=return_features,
        )
    extractor = PenultimateExtractor(model_template, feature_module)
    try:
        with eval_mode(model_template):
            return _vmapped(
                extractor, stacked_params_and_buffers, x, chunk, batch_size or VMAP_BATCH, return_features
            )
    except Exception as exc:  # noqa: BLE001 - any vmap failure; a real error re-raises in the loop
        logger.warning(
            "vmap evaluation of %s failed (%s: %s); falling back to a loop over %d models",
            type(model_template).__name__,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
            k_models,
        )
        return looped_logits_and_features(
            model_template,
            stacked_params_and_buffers,
            x,
            feature_module=feature_module,
            batch_size=batch_size,
            return_features=return_features,
        )
