"""``folder``: images the user supplies, one sub-folder per class name.

Layout: ``ROOT/<class name>/*.{png,jpg,jpeg,bmp,gif,webp,tif,tiff}``. Files are taken in sorted
name order, resized to the FL resolution (PIL, area-style ``BOX`` down-sampling, ``BICUBIC`` up)
and converted to grey (``L``) or RGB.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SynthError
from .base import GenContext, Request

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image(path: Path, resolution: tuple[int, int], channels: int) -> np.ndarray:
    """One image file -> uint8 [H, W, C]; a file PIL cannot decode raises SynthError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SynthError(f"cannot read image {path}: {e}") from e
    h, w = resolution
    resample = Image.Resampling.BOX if im.width >= w and im.height >= h else Image.Resampling.BICUBIC
    im = im.resize((w, h), resample=resample)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


class FolderGenerator:
    """Serve user images class by class (see module docstring).

    Parameters
    ----------
    ctx : GenContext
    root : str or Path
        Directory holding one sub-folder per class name (exact names, label order irrelevant).
    """

    name = "folder"
    joint = False

    def __init__(self, ctx: GenContext, root):
        if not root:
            raise SynthError("generator 'folder' needs --folder DIR (one sub-folder per class name)")
        self.ctx = ctx
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SynthError(f"--folder {self.root} is not a directory")
        self.files: list[list[Path]] = []
        missing, empty = [], []
        for cname in ctx.class_names:
            d = self.root / cname
            if not d.is_dir():
                missing.append(cname)
                self.files.append([])
                continue
            files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                empty.append(str(d))
            self.files.append(files)
        if missing:
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise SynthError(
                f"--folder {self.root} has no sub-folder for class(es) {missing}; found {present}; "
                "expected one sub-folder per class name"
            )
        if empty:
            raise SynthError(f"class folder(s) hold no images ({', '.join(IMAGE_SUFFIXES)}): {', '.join(empty)}")
        log.info("folder %s: %s images per class", self.root, [len(f) for f in self.files])

    def capacity(self, class_id: int) -> int | None:
        return len(self.files[class_id])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "provenance": f"user images from {self.root}",
            "config": {"root": str(self.root), "files_per_class": [len(f) for f in self.files]},
        }

    def generate(self, requests: Sequence[Request], chunk: int, seed: int) -> dict[int, np.ndarray]:
        out = {}
        for r in requests:
            paths = self.files[r.class_id][r.start : r.start + r.count]
            imgs = [load_image(p, self.ctx.resolution, self.ctx.channels) for p in paths]
            h, w = self.ctx.resolution
            out[r.class_id] = np.stack(imgs) if imgs else np.zeros((0, h, w, self.ctx.channels), np.uint8)
        return out
