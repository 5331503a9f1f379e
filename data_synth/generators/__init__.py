"""Pluggable image generators for the server dataset.

``teacher-inversion`` (data-free, offline), ``folder`` (user images), ``mllm`` (Janus text-to-image).
"""

from __future__ import annotations

from dataclasses import fields

from .base import GenContext, Generator, Request, derive_seed
from .folder import FolderGenerator
from .inversion import InversionConfig, TeacherInversionGenerator
from .mllm import JanusGenerator, MLLMConfig

from ..errors import SynthError

GENERATORS = ("teacher-inversion", "folder", "mllm")


def _checked(name: str, options: dict, config_cls, allowed: tuple = ()) -> dict:
    allowed = tuple(f.name for f in fields(config_cls)) if config_cls is not None else allowed
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise SynthError(f"unknown option(s) {bad} for generator {name!r}; allowed: {', '.join(allowed)}")
    return options


def make_generator(name: str, ctx: GenContext, options: dict | None = None) -> Generator:
    """Build a generator by registry name.

    Parameters
    ----------
    name : str
        One of ``GENERATORS``.
    ctx : GenContext
    options : dict, optional
        ``teacher-inversion``: ``InversionConfig`` fields; ``folder``: ``root``;
        ``mllm``: ``MLLMConfig`` fields.
    """
    options = dict(options or {})
    if name == "teacher-inversion":
        return TeacherInversionGenerator(ctx, InversionConfig(**_checked(name, options, InversionConfig)))
    if name == "folder":
        _checked(name, options, None, allowed=("root",))
        return FolderGenerator(ctx, options.get("root"))
    if name == "mllm":
        return JanusGenerator(ctx, MLLMConfig(**_checked(name, options, MLLMConfig)))
    raise SynthError(f"unknown generator {name!r}; choose from {', '.join(GENERATORS)}")


__all__ = [
    "GENERATORS",
    "FolderGenerator",
    "GenContext",
    "Generator",
    "InversionConfig",
    "JanusGenerator",
    "MLLMConfig",
    "Request",
    "TeacherInversionGenerator",
    "derive_seed",
    "make_generator",
]
