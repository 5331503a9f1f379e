"""Checkpointed chunks of an unfinished build, in ``<out>.partial-work/``.

One file per (chunk, class): ``chunk-0003-class-0007.npz`` holding the images, where they sit in
the class's stream (``start``), and the teacher's verdict (``pred``, ``conf``). Files are written to a
temporary name and renamed, so a file that exists is whole. ``key.json`` records the build key; a
work directory with another key (other config or teacher) is wiped before use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def work_dir_for(out_dir) -> Path:
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}.partial-work"


class ChunkStore:
    """Reads and writes the per-(chunk, class) checkpoint files of one build."""

    def __init__(self, root: Path, build_key: str):
        self.root = Path(root)
        self.build_key = build_key
        key_file = self.root / "key.json"
        if self.root.exists():
            old = None
            if key_file.is_file():
                try:
                    old = json.loads(key_file.read_text()).get("build_key")
                except (OSError, json.JSONDecodeError):
                    old = None
            if old != build_key:
                log.info("discarding checkpoints in %s: they belong to another config or teacher", self.root)
                shutil.rmtree(self.root)
            else:
                n = len(list(self.root.glob("chunk-*.npz")))
                log.info("resuming build from %s (%d checkpointed class chunks)", self.root, n)
        self.root.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            key_file.write_text(json.dumps({"build_key": build_key}))

    def path(self, chunk: int, class_id: int) -> Path:
        return self.root / f"chunk-{chunk:04d}-class-{class_id:04d}.npz"

    def load(self, chunk: int, class_id: int, start: int, count: int) -> dict | None:
        """The stored arrays if this exact slice was checkpointed, else None."""
        p = self.path(chunk, class_id)
        if not p.is_file():
            return None
        try:
            with np.load(p) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            log.warning("ignoring unreadable checkpoint %s (%s)", p, e)
            return None
        if int(data.get("start", -1)) != start or int(data.get("count", -1)) != count or len(data["images"]) != count:
            log.warning("ignoring checkpoint %s: it holds another slice", p)
            return None
        return data

    def save(self, chunk: int, class_id: int, start: int, count: int, images, pred, conf) -> None:
        p = self.path(chunk, class_id)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, images=images, pred=pred, conf=conf, start=np.int64(start), count=np.int64(count))
        os.replace(tmp, p)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
