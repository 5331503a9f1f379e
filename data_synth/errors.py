"""Errors raised by ``data_synth`` (all ``ValueError`` subclasses, so callers can catch one type)."""


class SynthError(ValueError):
    """A server-dataset build cannot proceed: bad setting, missing input or unusable generator."""
