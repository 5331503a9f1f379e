"""``defense="clipfed"``: teacher, server dataset and the CLIP-Fed wrapper, built from run-config.

Teacher (``clip-teacher``):

* ``standin`` (offline default): a small open_clip model trained contrastively on the clean held-out
  split (disjoint from every client and from the test set), built on first use and cached under
  ``cache-dir``; loaded through the same local-checkpoint path as real weights. It is NOT CLIP and
  every log line and results file says so.
* ``pretrained``: real CLIP weights named by ``clip-model`` + ``clip-pretrained`` (open_clip tag or a
  local checkpoint file) or ``clip-hf-model`` (transformers id or local directory). Nothing falls
  back from one teacher to the other: missing weights stop the run with a message.

Server dataset: ``sds-path`` (a directory written by ``python -m data_synth build``), or, when empty,
built on first use with the teacher-inversion generator (data-free, no client or test image) and
cached under ``cache-dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from torch import nn

from clipfed_strategy.config import CLIPFedConfig
from clipfed_strategy.core import CLIPFedDefense
from clipfed_strategy.message_api import CLIPFed
from clipfed_strategy.server_dataset import ServerDataset
from clipfed_strategy.teacher import TeacherSpec, load_teacher
from fltask.config import ConfigError, RunConfig
from fltask.datasets import TaskData
from fltask.partition import Split
from server_app.strategies import BuiltStrategy

log = logging.getLogger("clipfed")

TEACHERS = ("standin", "pretrained")
INNER = ("fedavg", "median", "trimmedmean")

# run-config keys of the defence with their defaults (also declared in pyproject.toml)
DEFAULTS: dict[str, Any] = {
    "clip-teacher": "standin",
    "clip-model": "ViT-B-32",
    "clip-pretrained": "openai",
    "clip-hf-model": "",
    "clip-backend": "",
    "clip-templates": "a photo of a {c}.;a blurry photo of a {c}.;a photo of the {c}.;a close-up photo of a {c}.",
    "clip-logit-scale": 0.0,
    "standin-epochs": 0,
    "sds-path": "",
    "sds-generator": "teacher-inversion",
    "sds-images-per-class": 100,
    "sds-min-conf": 0.5,
    "sds-max-per-class": 0,
    "faug-ops": "hf-noise,lf-blend,patch-tl,patch-tr,patch-bl,patch-br",
    "faug-copies": 1,
    "clipfed-inner": "fedavg",
}


def _get(cfg: RunConfig, key: str) -> Any:
    return cfg.extra.get(key, DEFAULTS[key])


def _choice(cfg: RunConfig, key: str, allowed: tuple[str, ...]) -> str:
    value = str(_get(cfg, key))
    if value not in allowed:
        raise ConfigError(f"run-config key '{key}' is {value!r}; allowed values: {', '.join(allowed)}")
    return value


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_spec(cfg: RunConfig, data: TaskData, split: Split) -> TeacherSpec:
    """The teacher's spec: the cached stand-in (trained now if missing) or real CLIP weights."""
    templates = str(_get(cfg, "clip-templates"))
    if _choice(cfg, "clip-teacher", TEACHERS) == "pretrained":
        return TeacherSpec.from_strings(
            model=str(_get(cfg, "clip-model")), pretrained=str(_get(cfg, "clip-pretrained")),
            hf_model=str(_get(cfg, "clip-hf-model")), backend=str(_get(cfg, "clip-backend")), templates=templates,
            logit_scale=float(_get(cfg, "clip-logit-scale")),
        )
    from clipfed_strategy.standin_teacher import load_or_train_standin

    if len(split.heldout) == 0:
        raise ConfigError("run-config key 'heldout-size' is 0, but clip-teacher=\"standin\" trains on the held-out split")
    preset = "digits" if cfg.dataset == "digits" else "cifar10"
    cache = cfg.cache_path / "standin" / f"{cfg.dataset}-heldout{len(split.heldout)}"
    epochs = int(_get(cfg, "standin-epochs")) or None
    spec = load_or_train_standin(
        data.x_train[split.heldout], data.y_train[split.heldout], list(data.class_names), cache, preset, epochs=epochs,
    )  # trained with the stand-in's own varied caption templates; zero-shot uses clip-templates below
    return replace(spec, templates=[t for t in templates.split(";") if t.strip()],
                   logit_scale=float(_get(cfg, "clip-logit-scale")))


def server_dataset(cfg: RunConfig, data: TaskData, teacher) -> ServerDataset:
    """Load ``sds-path``, or build the server dataset data-free with the teacher (cached); then keep at
    most ``sds-max-per-class`` clean images per class (and their variants) when that key is > 0."""
    sds = _full_server_dataset(cfg, data, teacher)
    per_class = int(_get(cfg, "sds-max-per-class"))
    if per_class < 0:
        raise ConfigError(f"run-config key 'sds-max-per-class' must be >= 0 (0 = all), got {per_class}")
    if per_class:
        full = len(sds)
        sds = sds.subset(per_class, seed=cfg.seed)
        log.info("server dataset: using %d of %d rows (sds-max-per-class=%d)", len(sds), full, per_class)
    return sds


def _full_server_dataset(cfg: RunConfig, data: TaskData, teacher) -> ServerDataset:
    path = str(_get(cfg, "sds-path"))
    if path:
        sds = ServerDataset.load(path)
        log.info("server dataset: %s (%d images, generator %s)", path, len(sds), sds.meta.get("generator", {}))
        return sds
    from data_synth.build import build_server_dataset

    h, w, c = data.image_shape
    settings = {
        "generator": str(_get(cfg, "sds-generator")),
        "images_per_class": int(_get(cfg, "sds-images-per-class")),
        "faug_ops": str(_get(cfg, "faug-ops")),
        "faug_copies": int(_get(cfg, "faug-copies")),
        "min_conf": float(_get(cfg, "sds-min-conf")),
    }
    out = cfg.cache_path / "server-datasets" / f"{cfg.dataset}-{_short_hash([teacher.identity, settings, h, c])}"
    log.info("server dataset: building or reusing %s (no client or test image is used)", out)
    return build_server_dataset(out, teacher, list(data.class_names), (h, w), c, seed=0, **settings)


def build_clipfed(cfg: RunConfig, model: nn.Module, data: TaskData, split: Split, kw: dict[str, Any]) -> BuiltStrategy:
    ccfg = CLIPFedConfig.from_run_config({**cfg.extra, "seed": cfg.seed})
    spec = teacher_spec(cfg, data, split)
    teacher = load_teacher(spec, list(data.class_names))
    sds = server_dataset(cfg, data, teacher)
    if sds.resolution != tuple(data.image_shape[:2]) or sds.channels != data.image_shape[2]:
        raise ConfigError(
            f"server dataset {sds.resolution}x{sds.channels} does not match the task's images {data.image_shape}: "
            "rebuild it with data_synth at the task's resolution and channels (run-config key 'sds-path')"
        )
    defense = CLIPFedDefense.from_teacher(model, sds, teacher, ccfg, cache_dir=str(cfg.cache_path / "teacher-outputs"))
    inner_name = _choice(cfg, "clipfed-inner", INNER)
    inner = {"fedavg": FedAvg, "median": FedMedian, "trimmedmean": FedTrimmedAvg}[inner_name](**kw)
    header = {"teacher": defense.teacher_info, "server_dataset": {"images": len(sds), "hash": sds.hash,
                                                                  "variants": sds.variant_names,
                                                                  "generator": sds.meta.get("generator")}}
    log.info("defense clipfed around %s with %s", inner_name, defense.teacher_info["label"])
    return BuiltStrategy(CLIPFed(inner, defense), header)
