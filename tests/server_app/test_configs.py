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


def test_every_clipfed_setting_is_a_run_config_key():
    """Each field of the CLIP-Fed settings has its key in pyproject.toml (so `--run-config` and the
    in-process CLI can set it), with the dataclass default as its value."""
    import dataclasses

    from clipfed_strategy.config import ScreeningConfig
    from clipfed_strategy.distillation import DistillConfig
    from clipfed_strategy.trigger_inversion import InversionConfig
    from clipfed_strategy.validation import ValidationConfig

    defaults = default_run_config()
    missing, differ = [], []
    for prefix, dc in (("screen-", ScreeningConfig), ("distill-", DistillConfig), ("invert-", InversionConfig),
                       ("validate-", ValidationConfig)):
        for f in dataclasses.fields(dc):
            key = prefix + f.name.replace("_", "-")
            key = key.replace("-batch-size", "-batch")  # the alias CLIPFedConfig.from_run_config reads
            if key not in defaults:
                missing.append(key)
            elif isinstance(f.default, (bool, int, float, str)):  # dataclasses.MISSING is none of these
                if defaults[key] != f.default:
                    differ.append((key, defaults[key], f.default))
    assert not missing, f"settings without a run-config key in pyproject.toml: {missing}"
    assert not differ, f"pyproject.toml values that differ from the code defaults: {differ}"
    # and every pyproject value is accepted as it is
    CLIPFedConfig.from_run_config(defaults)
