"""Suite-wide settings: one torch thread (shared CI cores), ``tests/`` importable, a results-dir fixture."""

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:  # pytest runs with --import-mode=importlib: make tests/*.py helpers importable
    sys.path.insert(0, str(_TESTS))


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """An empty, absolute results directory for one test."""
    d = tmp_path / "results"
    d.mkdir()
    return d


@pytest.fixture
def restore_task_identity():
    """Put Flower's process-global task identity back after a test (in-process runs set it)."""
    from flower_harness import preserved_task_identity

    with preserved_task_identity():
        yield
