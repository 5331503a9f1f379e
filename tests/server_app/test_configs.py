"""The ready-made run-configs in configs/: every key exists and every value passes validation."""

import tomllib
from pathlib import Path

import pytest

from clipfed_strategy.config import CLIPFedConfig
from fltask.config import parse_run_config
from server_app.inprocess import default_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"cifar10-cpu.toml", "cifar10-paper-gpu.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_known_and_valid(path, tmp_path):
    overrides = tomllib.loads(path.read_text())
    if "dataset-path" in overrides:  # a placeholder the user replaces
        (tmp_path / "cifar10.npz").write_bytes(b"")
        overrides["dataset-path"] = str(tmp_path / "cifar10.npz")
    defaults = default_run_config()
    unknown = sorted(set(overrides) - set(defaults))
    assert not unknown, f"{path.name}: keys not in pyproject.toml [tool.flwr.app.config]: {unknown}"
    merged = {**defaults, **overrides}
    parse_run_config(merged)
    CLIPFedConfig.from_run_config(merged)
