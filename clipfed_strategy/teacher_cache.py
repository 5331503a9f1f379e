"""Teacher outputs on the server dataset, computed once and cached on disk.

CLIP is frozen, so its zero-shot logits and image embeddings on the server dataset never change
while the dataset does not (method.md §3). They are stored as a safetensors file whose name is
``sha256(teacher identity, class names, templates, logit scale, dataset hash)``; a later run with
the same teacher and dataset loads them without running the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .teacher import Teacher, uint8_to_tensor

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class TeacherOutputs:
    """Teacher outputs for every row of a dataset.

    Attributes
    ----------
    logits : np.ndarray float32 [N, C]
        ``logit_scale * embeddings @ text_prototypes.T``.
    embeddings : np.ndarray float32 [N, D]
        L2-normalised image embeddings.
    identity : str
        The teacher's identity string.
    key : str
        The cache key (sha256 hex).
    from_cache : bool
        True when loaded from disk without running the teacher.
    """

    logits: np.ndarray
    embeddings: np.ndarray
    identity: str
    key: str = ""
    from_cache: bool = False

    def to_tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, embeddings)`` as float32 tensors on ``device``."""
        return torch.from_numpy(self.logits).to(device), torch.from_numpy(self.embeddings).to(device)


def array_hash(images: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes."""
    arr = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{arr.shape}{arr.dtype}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def cache_key(teacher: Teacher, dataset_hash: str) -> str:
    """sha256 over teacher identity, class names, templates, logit scale and the dataset hash."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "identity": teacher.identity,
            "class_names": list(teacher.class_names),
            "templates": list(teacher.templates),
            "logit_scale": round(float(teacher.logit_scale), 6),
            "dataset": dataset_hash,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def compute_teacher_outputs(teacher: Teacher, images: np.ndarray, batch_size: int | None = None) -> TeacherOutputs:
    """Run the teacher over uint8 NHWC ``images`` in batches (uint8 → float on the fly)."""
    bs = int(batch_size or teacher.batch_size)
    embs = []
    for i in range(0, len(images), bs):
        x = uint8_to_tensor(images[i : i + bs], teacher.device)
        embs.append(teacher.encode_images(x, batch_size=bs))
    emb = torch.cat(embs) if embs else torch.zeros(0, teacher.embed_dim, device=teacher.device)
    logits = teacher.logits_from_embeddings(emb)
    return TeacherOutputs(
        logits=logits.float().cpu().numpy(),
        embeddings=emb.float().cpu().numpy(),
        identity=teacher.identity,
    )


def teacher_outputs(
    teacher: Teacher,
    images,
    cache_dir: str | os.PathLike | None,
    dataset_hash: str | None = None,
    *,
    batch_size: int | None = None,
) -> TeacherOutputs:
    """Teacher logits and embeddings for ``images``, from the disk cache when possible.

    Parameters
    ----------
    teacher : Teacher
    images : np.ndarray or ServerDataset
        uint8 NHWC images, or a :class:`~clipfed_strategy.server_dataset.ServerDataset` (its
        ``images`` and ``content_hash()`` are used).
    cache_dir : path or None
        Directory of ``teacher-<key>.safetensors`` files; None = compute, do not cache.
    dataset_hash : str, optional
        Identifies the images; default: the dataset's content hash, or sha256 of the array.
    batch_size : int, optional
        Default ``teacher.batch_size``.
    """
    if hasattr(images, "images") and hasattr(images, "content_hash"):
        if not dataset_hash:
            dataset_hash = images.hash if hasattr(images, "hash") else images.content_hash()
        images = images.images
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"teacher_outputs expects uint8 NHWC images, got dtype {images.dtype}")
    dataset_hash = dataset_hash or array_hash(images)
    key = cache_key(teacher, dataset_hash)
    if cache_dir is None:
        return _with(compute_teacher_outputs(teacher, images, batch_size), key=key)

    path = Path(cache_dir) / f"teacher-{key[:32]}.safetensors"
    if path.is_file():
        out = _load(path, key, len(images))
        if out is not None:
            log.info("teacher outputs: cache hit %s (%d images, %s)", path, len(images), teacher.identity)
            return out
    log.info("teacher outputs: computing %d images with %s -> %s", len(images), teacher.identity, path)
    out = _with(compute_teacher_outputs(teacher, images, batch_size), key=key)
    _save(path, out, dataset_hash)
    return out


def _with(out: TeacherOutputs, **kw) -> TeacherOutputs:
    return TeacherOutputs(**{**out.__dict__, **kw})


def _save(path: Path, out: TeacherOutputs, dataset_hash: str) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            {"logits": np.ascontiguousarray(out.logits), "embeddings": np.ascontiguousarray(out.embeddings)},
            tmp,
            metadata={"identity": out.identity, "key": out.key, "dataset_hash": dataset_hash},
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, key: str, n: int) -> TeacherOutputs | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            logits, emb = f.get_tensor("logits"), f.get_tensor("embeddings")
    except Exception as e:  # corrupted / truncated file: recompute
        log.warning("teacher outputs: unreadable cache file %s (%s); recomputing", path, e)
        return None
    if meta.get("key") != key or len(logits) != n or len(emb) != n:
        log.warning("teacher outputs: cache file %s does not match this teacher/dataset; recomputing", path)
        return None
    return TeacherOutputs(logits=logits, embeddings=emb, identity=meta.get("identity", ""), key=key, from_cache=True)
