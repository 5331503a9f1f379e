"""Per-class text prompts for text-to-image generators, varied along four axes."""

from __future__ import annotations

from ..errors import SynthError

PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a {c}.",
        "a close-up photo of a {c}.",
        "a centered photo of a single {c}.",
        "a photo of a large {c}.",
    ),
    "context": (
        "a photo of a {c} in its natural surroundings.",
        "a photo of a {c} outdoors on a sunny day.",
        "a photo of a {c} indoors.",
        "a photo of a {c} at dusk.",
    ),
    "viewpoint": (
        "a photo of a {c} seen from the side.",
        "a photo of a {c} seen from above.",
        "a photo of a {c} seen from the front.",
        "a photo of a small {c} far away.",
    ),
    "style": (
        "a realistic photograph of a {c}.",
        "a low-resolution photo of a {c}.",
        "a drawing of a {c}.",
        "a painting of a {c}.",
    ),
}


def default_templates() -> list[str]:
    """All templates, interleaved across the axes so that the first few already differ in kind."""
    groups = list(PROMPT_TEMPLATES.values())
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def class_prompts(class_name: str, templates: list[str] | None = None) -> list[str]:
    """Fill ``{c}`` in every template with ``class_name``."""
    templates = list(templates) if templates else default_templates()
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise SynthError(f"prompt templates must contain '{{c}}': {bad}")
    return [t.replace("{c}", class_name) for t in templates]
