"""CLIP-Fed: a CLIP-guided federated backdoor defence (reconstructed from arXiv 2508.10315).

The torch core (``core``, ``teacher``, ``screening``, ``distillation``, …) imports no Flower; the
Flower adapters are ``CLIPFed`` (Message API, ``message_api.py``) and ``CLIPFedLegacy`` (legacy
``aggregate_fit`` API, ``legacy_api.py``). Names are imported lazily, so ``import clipfed_strategy``
does not pull in Flower or open_clip until they are used.
"""

from importlib import import_module

_EXPORTS = {
    "CLIPFed": "clipfed_strategy.message_api",
    "CLIPFedLegacy": "clipfed_strategy.legacy_api",
    "CLIPFedDefense": "clipfed_strategy.core",
    "ClientUpdate": "clipfed_strategy.core",
    "CLIPFedConfig": "clipfed_strategy.config",
    "ScreeningConfig": "clipfed_strategy.config",
    "DistillConfig": "clipfed_strategy.distillation",
    "ValidationConfig": "clipfed_strategy.validation",
    "ServerDataset": "clipfed_strategy.server_dataset",
    "TeacherSpec": "clipfed_strategy.teacher",
    "Teacher": "clipfed_strategy.teacher",
    "load_teacher": "clipfed_strategy.teacher",
    "train_standin_teacher": "clipfed_strategy.standin_teacher",
    "load_or_train_standin": "clipfed_strategy.standin_teacher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipfed_strategy' has no attribute {name!r}")
