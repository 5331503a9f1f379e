"""The server dataset: the images CLIP-Fed screens and distils on.

The server synthesises it itself (``data_synth``); it never holds a client sample. On disk it is a
directory with ``data.npz`` (arrays) and ``manifest.json`` (class names, variant names, provenance,
content hash). A directory is only loadable once its manifest says ``"complete": true``; writers
build into a temporary sibling and rename it into place, so an interrupted build never looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
CLEAN = "clean"


class ServerDatasetError(ValueError):
    """A server dataset is missing, incomplete or inconsistent."""


@dataclass
class ServerDataset:
    """Images (uint8 NHWC), clean labels, variant tags and the clean source of every row."""

    images: np.ndarray
    labels: np.ndarray
    variants: np.ndarray
    source_index: np.ndarray
    class_names: list[str]
    variant_names: list[str] = field(default_factory=lambda: [CLEAN])
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.uint8)
        if self.images.ndim == 3:  # N,H,W grey
            self.images = self.images[..., None]
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.variants = np.asarray(self.variants, dtype=np.int64)
        self.source_index = np.asarray(self.source_index, dtype=np.int64)
        self.class_names = [str(c) for c in self.class_names]
        self.variant_names = [str(v) for v in self.variant_names]
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise ServerDatasetError(f"images must be uint8 [N,H,W,C] with C in (1,3), got {self.images.shape}")
        for name in ("labels", "variants", "source_index"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ServerDatasetError(f"{name} must have shape ({n},), got {arr.shape}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ServerDatasetError(f"labels must lie in 0..{len(self.class_names) - 1}")
        if n and (self.variants.min() < 0 or self.variants.max() >= len(self.variant_names)):
            raise ServerDatasetError(f"variants must index variant_names {self.variant_names}")
        if n and (self.source_index.min() < 0 or self.source_index.max() >= n):
            raise ServerDatasetError("source_index must point at rows of the dataset")
        if not self.variant_names or self.variant_names[0] != CLEAN:
            raise ServerDatasetError(f"variant 0 must be {CLEAN!r}, got {self.variant_names[:1]}")
        if n and not np.all(self.variants[self.source_index] == 0):
            raise ServerDatasetError("every source_index must point at a clean row")

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def clean_mask(self) -> np.ndarray:
        return self.variants == 0

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class name × variant name."""
        out: dict[str, dict[str, int]] = {}
        for c, cname in enumerate(self.class_names):
            row = {}
            for v, vname in enumerate(self.variant_names):
                row[vname] = int(np.sum((self.labels == c) & (self.variants == v)))
            out[cname] = row
        return out

    def subset(self, per_class: int, seed: int = 0) -> "ServerDataset":
        """At most ``per_class`` clean images per class (drawn with ``seed``) and all their variants.

        Screening costs K forward passes over the rows and distillation an epoch over them, so this
        is the knob that trades server time against coverage (run-config ``sds-max-per-class``).
        The provenance records the subset; the content hash is that of the subset's arrays.
        """
        if per_class <= 0:
            raise ServerDatasetError(f"per_class must be > 0, got {per_class}")
        rng = np.random.default_rng(seed)
        clean = np.flatnonzero(self.variants == 0)
        chosen = []
        for c in range(len(self.class_names)):
            rows = clean[self.labels[clean] == c]
            if len(rows) > per_class:
                rows = np.sort(rng.choice(rows, per_class, replace=False))
            chosen.append(rows)
        keep_src = np.zeros(len(self), dtype=bool)
        keep_src[np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)] = True
        keep = keep_src[self.source_index]  # clean rows are their own source
        new_index = np.full(len(self), -1, dtype=np.int64)
        new_index[keep] = np.arange(int(keep.sum()))
        meta = {**self.meta, "subset": {"per_class": int(per_class), "seed": int(seed), "of": len(self)}}
        return ServerDataset(self.images[keep], self.labels[keep], self.variants[keep],
                             new_index[self.source_index[keep]], list(self.class_names), list(self.variant_names), meta)

    def to_tensors(self, device="cpu"):
        """``(x float NCHW in [0,1], labels, variants, source_index)`` as torch tensors on ``device``."""
        import torch

        x = torch.from_numpy(self.images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        return (
            x.contiguous(),
            torch.from_numpy(self.labels).to(device),
            torch.from_numpy(self.variants).to(device),
            torch.from_numpy(self.source_index).to(device),
        )

    def content_hash(self) -> str:
        """sha256 over the arrays, class names and variant names (not over provenance)."""
        h = hashlib.sha256()
        for arr in (self.images, self.labels, self.variants, self.source_index):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps([self.class_names, self.variant_names]).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: build in a temporary sibling directory, then rename into place."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            np.savez(
                tmp / "data.npz",
                images=self.images,
                labels=self.labels,
                variants=self.variants,
                source_index=self.source_index,
            )
            manifest = dict(self.meta)
            manifest.update(
                format_version=FORMAT_VERSION,
                class_names=self.class_names,
                variants=self.variant_names,
                resolution=list(self.resolution),
                channels=self.channels,
                num_images=len(self),
                counts=self.counts(),
                content_hash=self.content_hash(),
                complete=True,
            )
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verify_hash: bool = True) -> "ServerDataset":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise ServerDatasetError(
                f"no server dataset at {path}: {manifest_path.name} is missing "
                "(build one with `python -m data_synth build --out DIR`)"
            )
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise ServerDatasetError(f"server dataset at {path} is incomplete (interrupted build?)")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ServerDatasetError(
                f"server dataset at {path} has format_version {manifest.get('format_version')}, "
                f"this clipfed reads {FORMAT_VERSION}"
            )
        with np.load(path / "data.npz") as z:
            arrays = {k: z[k] for k in ("images", "labels", "variants", "source_index")}
        meta = {
            k: v
            for k, v in manifest.items()
            if k not in ("class_names", "variants", "counts", "complete", "format_version")
        }
        ds = cls(
            class_names=manifest["class_names"],
            variant_names=manifest["variants"],
            meta=meta,
            **arrays,
        )
        if verify_hash and manifest.get("content_hash") != ds.content_hash():
            raise ServerDatasetError(f"server dataset at {path} fails its content hash (corrupted?)")
        return ds

    @property
    def hash(self) -> str:
        if "_hash" not in self.__dict__:
            self.__dict__["_hash"] = self.content_hash()
        return self.__dict__["_hash"]
