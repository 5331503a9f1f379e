"""What every image generator offers the builder.

A build asks a generator for images in *chunks*: one :class:`Request` per class, saying which slice
of that class's image stream to produce (``start`` = how many images of the class came before).
Generators must be deterministic in ``(seed, chunk, requests)`` so that an interrupted build resumes
to the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class Request:
    """Images ``start .. start + count - 1`` of class ``class_id``'s stream."""

    class_id: int
    start: int
    count: int


@dataclass
class GenContext:
    """What a generator may use.

    Parameters
    ----------
    class_names : list of str
        In label order.
    resolution : tuple of int
        ``(H, W)`` of the images to return.
    channels : int
        1 (grey) or 3 (RGB).
    device : torch.device
        Where to compute.
    teacher : object or None
        A ``clipfed_strategy.teacher.Teacher`` (or look-alike); None when the generator needs none.
    progress : bool
        Show tqdm progress bars. Default True.
    """

    class_names: list[str]
    resolution: tuple[int, int]
    channels: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: object = None
    progress: bool = True


@runtime_checkable
class Generator(Protocol):
    """A source of labelled images at the FL resolution.

    Attributes
    ----------
    name : str
        Registry name (``teacher-inversion``, ``folder``, ``mllm``).
    joint : bool
        True when the classes of one chunk are produced together (one batch); the builder then
        regenerates a whole chunk if any class file of it is missing.
    """

    name: str
    joint: bool

    def generate(self, requests: Sequence[Request], chunk: int, seed: int) -> dict[int, np.ndarray]:
        """uint8 [count, H, W, C] images per requested class id."""
        ...

    def capacity(self, class_id: int) -> int | None:
        """How many images the class can ever yield (None = unlimited)."""
        ...

    def describe(self) -> dict:
        """Name, provenance and config (JSON-serialisable); it is part of the build key."""
        ...


def derive_seed(*parts) -> int:
    """A 63-bit seed from integers and strings (stable across runs and platforms)."""
    import zlib

    ints = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    ss = np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)
