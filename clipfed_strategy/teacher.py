"""The frozen CLIP teacher: zero-shot text prototypes and image embeddings.

CLIP-Fed uses CLIP's zero-shot knowledge on the server dataset (arXiv 2508.10315; method.md §3).
A :class:`Teacher` wraps either an ``open_clip`` model (``backend="open_clip"``: a model name plus a
tag or a local checkpoint file) or a transformers ``CLIPModel`` (``backend="hf"``: a hub id or a
local directory). It is frozen and in eval mode, takes images the way every clipfed package holds
them (float NCHW in [0, 1], any size, 1 or 3 channels) and does CLIP's own preprocessing as batched
tensor ops: grey→RGB, resize of the shortest side, centre crop, the model's mean/std.

The offline stand-in (``standin_teacher.py``) loads through exactly the same open_clip
local-checkpoint path as real weights; only ``is_standin`` (and the identity) tells them apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("open_clip", "hf")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
# Run-config keys (pyproject [tool.flwr.app.config]) that feed a TeacherSpec; named in errors.
KEY_MODEL = "clip-model"
KEY_PRETRAINED = "clip-pretrained"
KEY_HF_MODEL = "clip-hf-model"
KEY_BACKEND = "clip-backend"
KEY_TEMPLATES = "clip-templates"
KEY_MODEL_CONFIG = "clip-model-config"
STANDIN_LABEL = "STAND-IN teacher, not CLIP"


class TeacherLoadError(ValueError):
    """The teacher cannot be built: bad spec, unknown backend, or weights not available offline."""


# ---------------------------------------------------------------------------------------- spec
@dataclass
class TeacherSpec:
    """Where the teacher's weights come from.

    Parameters
    ----------
    backend : str
        ``"open_clip"`` (default) or ``"hf"`` (transformers ``CLIPModel``).
    model : str
        open_clip model name (``"ViT-B-32"``, or a custom name registered from ``model_config``).
    pretrained : str
        open_clip pretrained tag (``"openai"``) or an absolute path to a local checkpoint file.
        Default ``"openai"``.
    hf_model : str
        For ``backend="hf"``: a hub id (``"openai/clip-vit-base-patch32"``) or a local directory
        written by ``save_pretrained`` (model + tokenizer, ideally the image processor too).
    model_config : str
        Optional path to an open_clip JSON model config, registered with
        ``open_clip.add_model_config`` before the model is created; its file stem must equal
        ``model``. Default ``""`` (also looked for as ``<checkpoint dir>/<model>.json``).
    templates : list of str
        Prompt templates containing ``"{c}"``. Default ``["a photo of a {c}."]``.
    logit_scale : float
        Zero-shot logit scale; ``0`` (default) uses the model's learned one (≈100 for OpenAI CLIP).
    is_standin : bool
        True for the offline stand-in teacher (also set automatically when a ``standin.json``
        lies next to the checkpoint). Default False.
    device : str or None
        Torch device; None = CUDA if available, else CPU.
    batch_size : int
        Images per forward pass in :meth:`Teacher.encode_images`. Default 256.
    """

    backend: str = "open_clip"
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    hf_model: str = ""
    model_config: str = ""
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    logit_scale: float = 0.0
    is_standin: bool = False
    device: str | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.templates, str):
            self.templates = parse_templates(self.templates)
        self.templates = [str(t) for t in self.templates]
        self.logit_scale = float(self.logit_scale)

    @classmethod
    def from_strings(
        cls,
        model: str = "ViT-B-32",
        pretrained: str = "openai",
        hf_model: str = "",
        templates: str | Sequence[str] = "a photo of a {c}.",
        logit_scale: float | str = 0.0,
        backend: str = "",
        model_config: str = "",
        is_standin: bool = False,
        device: str | None = None,
        batch_size: int = 256,
    ) -> "TeacherSpec":
        """Build a spec from flat run-config values.

        ``backend=""`` picks ``"hf"`` when ``hf_model`` is set, else ``"open_clip"``. ``templates``
        may be one string with ``;``-separated templates. ``pretrained`` may be a tag or a path
        (``~`` is expanded, relative paths are made absolute).
        """
        backend = (backend or "").strip() or ("hf" if str(hf_model).strip() else "open_clip")
        pretrained = str(pretrained).strip()
        if pretrained and _looks_like_path(pretrained):
            pretrained = str(Path(pretrained).expanduser().resolve())
        spec = cls(
            backend=backend,
            model=str(model).strip(),
            pretrained=pretrained,
            hf_model=str(hf_model).strip(),
            model_config=str(model_config).strip(),
            templates=parse_templates(templates) if isinstance(templates, str) else list(templates),
            logit_scale=float(logit_scale),
            is_standin=bool(is_standin),
            device=device,
            batch_size=int(batch_size),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise TeacherLoadError(
                f"unknown teacher backend {self.backend!r} ({KEY_BACKEND}); allowed: {', '.join(BACKENDS)}"
            )
        if not self.templates:
            raise TeacherLoadError(f"{KEY_TEMPLATES} must hold at least one template containing '{{c}}'")
        for t in self.templates:
            if "{c}" not in t:
                raise TeacherLoadError(f"prompt template {t!r} ({KEY_TEMPLATES}) must contain '{{c}}'")
        if self.logit_scale < 0:
            raise TeacherLoadError(f"logit scale must be >= 0 (0 = learned), got {self.logit_scale}")
        if self.backend == "open_clip" and not self.model:
            raise TeacherLoadError(f"{KEY_MODEL} must name an open_clip model, e.g. 'ViT-B-32'")
        if self.backend == "hf" and not self.hf_model:
            raise TeacherLoadError(
                f"backend 'hf' needs {KEY_HF_MODEL}: a hub id or a local save_pretrained directory"
            )
        if self.batch_size < 1:
            raise TeacherLoadError(f"teacher batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.model,
            "pretrained": self.pretrained,
            "hf_model": self.hf_model,
            "model_config": self.model_config,
            "templates": list(self.templates),
            "logit_scale": self.logit_scale,
            "is_standin": self.is_standin,
        }


def parse_templates(text: str | Sequence[str]) -> list[str]:
    """``"a photo of a {c}.;a blurry photo of a {c}."`` → list of non-empty templates."""
    if not isinstance(text, str):
        return [str(t) for t in text]
    return [t.strip() for t in text.split(";") if t.strip()]


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.startswith(("~", ".")) or s.endswith((".pt", ".pth", ".bin", ".safetensors"))


# ---------------------------------------------------------------------------------- preprocessing
def uint8_to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 NHWC (or NHW) → float32 NCHW in [0, 1] on ``device``."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N,H,W,C] with C in (1,3), got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def resize_to_model(
    x: torch.Tensor, size: tuple[int, int], resize_to: int | None = None, interpolation: str = "bicubic"
) -> torch.Tensor:
    """Grey→RGB, resize the shortest side to ``resize_to`` (default: ``min(size)``), centre-crop to
    ``size``; stays in [0, 1]. ``x`` is float NCHW with C in {1, 3}."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"teacher input must be float NCHW with C in (1,3), got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    th, tw = size
    short = resize_to or min(th, tw)
    scale = short / min(h, w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        mode = interpolation if interpolation in ("bicubic", "bilinear") else "bilinear"
        x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[:, :, top : top + th, left : left + tw]


def normalize_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------- the teacher
@dataclass
class _Backend:
    """What a loaded model offers the Teacher (built by the loaders below)."""

    module: torch.nn.Module
    encode_pixels: Callable[[torch.Tensor], torch.Tensor]  # normalised pixels -> [N,D] (unnormalised)
    encode_texts: Callable[[list[str]], torch.Tensor]  # captions -> [M,D] (unnormalised)
    image_size: tuple[int, int]
    resize_to: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    learned_logit_scale: float
    identity: str


class Teacher:
    """Frozen CLIP-style teacher (eval mode, no gradients).

    Attributes
    ----------
    identity : str
        backend:model:weights, e.g. ``"open_clip:ViT-B-32:openai"`` or
        ``"open_clip:clipfed-standin-digits:/abs/standin.pt@1a2b3c4d"``.
    is_standin : bool
    class_names : list of str
    templates : list of str
    embed_dim : int
    text_prototypes : Tensor [C, D]
        Per class: mean of L2-normalised text embeddings over the templates, re-normalised.
    logit_scale : float
    image_size : tuple of int
    batch_size : int
    device : torch.device
    """

    def __init__(self, backend: _Backend, class_names: Sequence[str], spec: TeacherSpec, device: torch.device):
        self._backend = backend
        self.model = backend.module.eval().requires_grad_(False)
        self.device = device
        self.identity = backend.identity
        self.is_standin = bool(spec.is_standin)
        self.class_names = [str(c) for c in class_names]
        self.templates = list(spec.templates)
        self.batch_size = int(spec.batch_size)
        self.image_size = backend.image_size
        self.logit_scale = float(spec.logit_scale) if spec.logit_scale > 0 else backend.learned_logit_scale
        self.text_prototypes = self.encode_class_prompts(self.class_names, self.templates)
        self.embed_dim = int(self.text_prototypes.shape[1])

    def __repr__(self) -> str:
        return (
            f"Teacher({self.identity!r}, standin={self.is_standin}, classes={len(self.class_names)}, "
            f"dim={self.embed_dim}, scale={self.logit_scale:.2f}, image_size={self.image_size})"
        )

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_class_prompts(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[C, D] text prototypes: normalised mean over templates of normalised text embeddings."""
        captions = [t.replace("{c}", c) for c in class_names for t in templates]
        with self._autocast():
            emb = self._backend.encode_texts(captions)
        emb = F.normalize(emb.float(), dim=-1).view(len(class_names), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW [0,1], any size, 1 or 3 channels → the model's normalised input."""
        b = self._backend
        x = resize_to_model(x.to(self.device), b.image_size, b.resize_to, b.interpolation)
        return normalize_pixels(x, b.mean, b.std)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """[N, D] L2-normalised image embeddings (float32, on ``self.device``)."""
        bs = int(batch_size or self.batch_size)
        out = []
        for i in range(0, len(x), bs):
            xb = self.preprocess(x[i : i + bs])
            with self._autocast():
                emb = self._backend.encode_pixels(xb)
            out.append(F.normalize(emb.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    def encode_images_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`encode_images` but differentiable w.r.t. ``x`` (one batch; the weights stay frozen).

        Data-free synthesis (``data_synth``'s teacher inversion) optimises pixels through it.
        """
        emb = self._backend.encode_pixels(self.preprocess(x))
        return F.normalize(emb.float(), dim=-1)

    def logits_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """``logit_scale * emb @ text_prototypes.T``."""
        return self.logit_scale * emb.to(self.text_prototypes) @ self.text_prototypes.T

    @torch.no_grad()
    def zero_shot_logits(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """[N, C] = logit_scale * encode_images(x) @ text_prototypes.T."""
        return self.logits_from_embeddings(self.encode_images(x, batch_size))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return self.zero_shot_logits(x, batch_size).argmax(dim=1)


# ------------------------------------------------------------------------------------ loading
def load_teacher(
    spec: TeacherSpec,
    class_names: Sequence[str],
    device: str | torch.device | None = None,
    templates: Sequence[str] | None = None,
) -> Teacher:
    """Build a frozen :class:`Teacher` from ``spec``.

    Parameters
    ----------
    spec : TeacherSpec
    class_names : sequence of str
        Class names in label order (they fill ``{c}`` in the templates).
    device : str or torch.device, optional
        Overrides ``spec.device``; default CUDA if available, else CPU.
    templates : sequence of str, optional
        Overrides ``spec.templates``.

    Raises
    ------
    TeacherLoadError
        Unknown backend, bad templates, or weights that cannot be had (offline, missing file),
        with the run-config keys to change.
    """
    if isinstance(device, (list, tuple)):
        raise TypeError("load_teacher(spec, class_names, device=None, templates=None): pass templates by keyword")
    if templates is not None:
        spec = replace(spec, templates=list(templates))
    spec.validate()
    if not class_names:
        raise TeacherLoadError("the teacher needs at least one class name")
    dev = torch.device(device or spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.backend == "open_clip":
        backend, spec = _load_open_clip(spec, dev)
    else:
        backend = _load_hf(spec, dev)
    teacher = Teacher(backend, class_names, spec, dev)
    log.info(
        "teacher %s%s: %d classes × %d templates, dim %d, logit scale %.2f, input %s on %s",
        teacher.identity,
        " (STAND-IN, not CLIP)" if teacher.is_standin else "",
        len(teacher.class_names),
        len(teacher.templates),
        teacher.embed_dim,
        teacher.logit_scale,
        "×".join(map(str, teacher.image_size)),
        dev,
    )
    return teacher


def _offline_hint(spec: TeacherSpec) -> str:
    return (
        f"No CLIP weights can be downloaded here. Point {KEY_PRETRAINED} at a local open_clip checkpoint "
        f"file (absolute path, with {KEY_MODEL} naming its architecture, e.g. ViT-B-32), or set "
        f"{KEY_HF_MODEL} to a local directory written by transformers' CLIPModel.save_pretrained "
        f"(plus its tokenizer/processor), or use the offline stand-in teacher "
        f"(python -m clipfed_strategy.standin_teacher). Requested: {spec.backend} "
        f"model={spec.model!r} pretrained={spec.pretrained!r} hf_model={spec.hf_model!r}."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable(may_download: bool = True):
    """Switch huggingface_hub to offline mode (cache only, fails fast) when the hub is unreachable,
    instead of ~1 minute of retries per file."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - hub is a dependency of open_clip/transformers
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    if may_download and not previous and not _hub_reachable():
        log.info("Hugging Face hub unreachable: loading teacher weights from the local cache only")
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


_SHA_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 hex


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _register_model_config(spec: TeacherSpec) -> TeacherSpec:
    """Register a custom open_clip JSON config (explicit, or ``<ckpt dir>/<model>.json``); mark
    stand-ins found by their ``standin.json`` label."""
    import open_clip

    cfg_path = spec.model_config
    ckpt = Path(spec.pretrained) if spec.pretrained and os.path.isabs(spec.pretrained) else None
    if not cfg_path and ckpt is not None and (ckpt.parent / f"{spec.model}.json").is_file():
        cfg_path = str(ckpt.parent / f"{spec.model}.json")
    if cfg_path:
        p = Path(cfg_path).expanduser().resolve()
        if not p.is_file():
            raise TeacherLoadError(f"open_clip model config {p} ({KEY_MODEL_CONFIG}) does not exist")
        if p.stem != spec.model:
            raise TeacherLoadError(
                f"open_clip registers a config under its file stem: {p.name} registers {p.stem!r}, "
                f"but {KEY_MODEL} is {spec.model!r}; rename the file or change {KEY_MODEL}"
            )
        open_clip.add_model_config(p)  # re-adding moves this file last, so it wins name clashes
        if open_clip.get_model_config(spec.model) != json.loads(p.read_text()):
            raise TeacherLoadError(f"open_clip did not register {p} as model {spec.model!r}")
        spec = replace(spec, model_config=str(p))
    if ckpt is not None and not spec.is_standin:
        info = ckpt.parent / "standin.json"
        if info.is_file():
            try:
                is_standin = json.loads(info.read_text()).get("label") == STANDIN_LABEL
            except (OSError, json.JSONDecodeError):
                is_standin = False
            if is_standin:
                spec = replace(spec, is_standin=True)
    return spec


def _load_open_clip(spec: TeacherSpec, device: torch.device) -> tuple[_Backend, TeacherSpec]:
    import open_clip

    if spec.pretrained and os.path.isabs(spec.pretrained) and not os.path.isfile(spec.pretrained):
        raise TeacherLoadError(f"checkpoint file {spec.pretrained} ({KEY_PRETRAINED}) does not exist. " + _offline_hint(spec))
    spec = _register_model_config(spec)
    if spec.model not in open_clip.list_models():
        raise TeacherLoadError(
            f"unknown open_clip model {spec.model!r} ({KEY_MODEL}); built-in names include "
            f"{', '.join(open_clip.list_models()[:8])}, ... (a custom one needs {KEY_MODEL_CONFIG})"
        )
    try:
        with _offline_unless_reachable(may_download=not os.path.isfile(spec.pretrained or "")):
            model, _, _ = open_clip.create_model_and_transforms(
                spec.model, pretrained=spec.pretrained or None, device=device
            )
            tokenizer = open_clip.get_tokenizer(spec.model)
    except TeacherLoadError:
        raise
    except Exception as e:  # open_clip raises RuntimeError for unknown tags and failed downloads
        raise TeacherLoadError(f"could not load open_clip weights: {e}. " + _offline_hint(spec)) from e
    if not spec.pretrained:
        log.warning("teacher %s has NO pretrained weights (random init): %s is empty", spec.model, KEY_PRETRAINED)
    if spec.pretrained and os.path.isfile(spec.pretrained):
        weights = f"{spec.pretrained}@{file_sha256(spec.pretrained)[:8]}"
    else:
        weights = spec.pretrained or "random"
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)

    def encode_texts(captions: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(captions).to(device))

    backend = _Backend(
        module=model,
        encode_pixels=model.encode_image,
        encode_texts=encode_texts,
        image_size=size,
        resize_to=min(size),
        mean=tuple(pp.get("mean", getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pp.get("std", getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)),
        interpolation=str(pp.get("interpolation", "bicubic")),
        learned_logit_scale=float(model.logit_scale.detach().float().exp().clamp(max=100.0)),
        identity=f"open_clip:{spec.model}:{weights}",
    )
    return backend, spec


def _field(obj, key: str):
    """``obj[key]`` for dicts, ``obj.key`` for transformers' SizeDict; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _load_hf(spec: TeacherSpec, device: torch.device) -> _Backend:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    src = spec.hf_model
    local = Path(src).expanduser()
    is_local = local.is_dir()
    if not is_local and (os.path.isabs(src) or src.startswith((".", "~"))):
        raise TeacherLoadError(f"directory {src} ({KEY_HF_MODEL}) does not exist. " + _offline_hint(spec))
    src = str(local.resolve()) if is_local else src
    try:
        with _offline_unless_reachable(may_download=not is_local):
            model = CLIPModel.from_pretrained(src).to(device)
            tokenizer = AutoTokenizer.from_pretrained(src)
            try:
                processor = CLIPImageProcessor.from_pretrained(src)
            except (OSError, ValueError):
                processor = None
    except Exception as e:
        raise TeacherLoadError(f"could not load transformers CLIPModel {src!r}: {e}. " + _offline_hint(spec)) from e

    n = int(model.config.vision_config.image_size)
    size, resize_to = (n, n), n
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    interpolation = "bicubic"
    if processor is not None:
        mean = tuple(processor.image_mean or mean)
        std = tuple(processor.image_std or std)
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", True) and _field(crop, "height"):
            size = (int(_field(crop, "height")), int(_field(crop, "width")))
        short = _field(getattr(processor, "size", None), "shortest_edge")
        resize_to = int(short) if short else min(size)
        if int(getattr(processor, "resample", 3) or 3) == 2:
            interpolation = "bilinear"
    else:
        log.warning("no CLIPImageProcessor config in %s: using OpenAI CLIP mean/std at %d px", src, n)
    max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    def _features(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def encode_pixels(x: torch.Tensor) -> torch.Tensor:
        return _features(model.get_image_features(pixel_values=x))

    def encode_texts(captions: list[str]) -> torch.Tensor:
        enc = tokenizer(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return _features(model.get_text_features(**enc))

    if is_local:
        weights = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
        digest = hashlib.sha256("".join(file_sha256(w) for w in weights).encode()).hexdigest()[:8]
        identity = f"hf:{src}@{digest}"
    else:
        identity = f"hf:{src}"
    return _Backend(
        module=model,
        encode_pixels=encode_pixels,
        encode_texts=encode_texts,
        image_size=size,
        resize_to=resize_to,
        mean=mean,
        std=std,
        interpolation=interpolation,
        learned_logit_scale=float(model.logit_scale.detach().float().exp().clamp(max=100.0)),
        identity=identity,
    )
