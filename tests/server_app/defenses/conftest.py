"""Make ``tests/flower_harness.py`` and this folder's test kit importable (pytest runs with importlib mode)."""

import sys
from pathlib import Path

for _p in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
