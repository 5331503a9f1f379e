"""Shared test plumbing: load a helper file that sits next to a test module, once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_sibling(test_file: str, filename: str, name: str) -> ModuleType:
    """``filename`` (beside ``test_file``) as module ``name``; test folders are not packages."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(test_file).with_name(filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
