"""Named class lists for ``--dataset-classes`` (label order matters: it must match the FL task)."""

from __future__ import annotations

from .errors import SynthError

CLASS_LISTS: dict[str, tuple[str, ...]] = {
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def resolve_class_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Turn ``"digits"``, ``"cifar10"`` or a CSV list ``"a,b,c"`` into class names in label order.

    Parameters
    ----------
    spec : str or sequence of str
        A known list name (see ``CLASS_LISTS``), a comma-separated list of at least two names, or
        an already-split sequence.

    Raises
    ------
    SynthError
        Unknown list name, fewer than two classes, empty or repeated names.
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in CLASS_LISTS:
            return list(CLASS_LISTS[key])
        if "," not in spec:
            raise SynthError(
                f"--dataset-classes {spec!r} is not a known class list ({', '.join(CLASS_LISTS)}) "
                "nor a comma-separated list of class names"
            )
        names = [s.strip() for s in spec.split(",")]
    else:
        names = [str(s).strip() for s in spec]
    if len(names) < 2 or any(not n for n in names):
        raise SynthError(f"--dataset-classes needs at least two non-empty class names, got {names}")
    if len(set(names)) != len(names):
        raise SynthError(f"--dataset-classes repeats a class name: {names}")
    return names
