"""Run-config parsing: defaults match pyproject, bad values fail at start naming the key and allowed values."""

import tomllib
from pathlib import Path

import pytest

from fltask.config import ConfigError, RunConfig, parse_run_config

ROOT = Path(__file__).resolve().parents[2]


def pyproject_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_parse_to_the_dataclass_defaults():
    raw = pyproject_config()
    cfg = parse_run_config(raw)
    assert cfg == RunConfig()
    task_keys = set(RunConfig().to_dict())
    assert task_keys <= set(raw), f"task keys missing from pyproject: {sorted(task_keys - set(raw))}"
    assert set(cfg.extra) == set(raw) - task_keys  # the rest is kept for its owner (e.g. the defence)
    # to_dict round-trips to the same kebab-case keys and values
    assert {k: v for k, v in cfg.to_dict().items() if k in raw} == {k: raw[k] for k in raw}


def test_unknown_keys_are_kept_for_their_owner():
    cfg = parse_run_config({"clipfed.server-epochs": 3, "alpha": 1})
    assert cfg.extra == {"clipfed.server-epochs": 3}
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float)
    assert cfg.to_dict()["clipfed.server-epochs"] == 3


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ({"dataset": "mnist"}, "dataset", ["digits", "cifar10", "cifar10-lt"]),
        ({"attack": "trojan"}, "attack", ["none", "badnets", "blend", "dba"]),
        ({"defense": "magic"}, "defense", ["fedavg", "krum", "multikrum", "median", "trimmedmean", "bulyan", "clipfed"]),
        ({"partition": "shards"}, "partition", ["dirichlet", "iid"]),
        ({"model": "vgg"}, "model", ["cnn", "resnet8", "resnet18"]),
        ({"attacker-sampling": "sometimes"}, "attacker-sampling", ["fixed", "per-round"]),
        ({"trigger-position": "middle"}, "trigger-position", ["bottom-right", "center"]),
        ({"dataset-source": "s3"}, "dataset-source", ["npz", "folder", "flwr-datasets"]),
    ],
)
def test_unknown_choice_names_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        parse_run_config(override)
    msg = str(err.value)
    assert f"'{key}'" in msg
    assert str(next(iter(override.values()))) in msg
    for value in allowed:
        assert value in msg


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0])
def test_non_positive_alpha_fails(alpha):
    with pytest.raises(ConfigError, match=r"'alpha'.*> 0"):
        parse_run_config({"alpha": alpha})


@pytest.mark.parametrize("ids", ["0,10", "12", "-1"])
def test_malicious_id_out_of_range_fails_naming_the_range(ids):
    with pytest.raises(ConfigError, match=r"'malicious-ids'.*0\.\.9"):
        parse_run_config({"malicious-ids": ids, "num-clients": 10})


def test_malicious_ids_must_be_integers():
    with pytest.raises(ConfigError, match="'malicious-ids'"):
        parse_run_config({"malicious-ids": "zero,three"})
    assert parse_run_config({"malicious-ids": " 0, 3 ,"}).malicious_id_set == {0, 3}
    # `flwr run --run-config malicious-ids=3` (no quotes) arrives as a TOML integer
    assert parse_run_config({"malicious-ids": 3}).malicious_id_set == {3}
    with pytest.raises(ConfigError, match="'malicious-ids'"):
        parse_run_config({"malicious-ids": 0.5})


def test_missing_dataset_path_fails(tmp_path):
    with pytest.raises(ConfigError, match="'dataset-path'.*does not exist"):
        parse_run_config({"dataset": "cifar10", "dataset-path": str(tmp_path / "nope.npz")})
    for source in ("npz", "folder"):
        with pytest.raises(ConfigError, match="'dataset-path' must be set"):
            parse_run_config({"dataset": "cifar10", "dataset-source": source})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"num-server-rounds": "ten"}, "num-server-rounds"),
        ({"num-clients": 2.5}, "num-clients"),
        ({"lr": "fast"}, "lr"),
        ({"dataset": 3}, "dataset"),
        ({"poison-rate": 1.5}, "poison-rate"),
        ({"dba-parts": 3}, "dba-parts"),
        ({"boost-factor": 0.5}, "boost-factor"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"attack-target": 10}, "attack-target"),
    ],
)
def test_bad_types_and_ranges_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_run_config(override)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_results_path_is_absolute_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_run_config({"results-dir": "out", "malicious-ids": "1"})
    assert cfg.results_path.is_absolute()
    assert cfg.results_path == tmp_path.resolve() / "out" / "digits_cnn_a0.5_badnets_fedavg_s0"
    assert parse_run_config({"run-name": "mine"}).results_path.name == "mine"
    assert cfg.num_attackers == 1
    assert parse_run_config({"attack": "none"}).num_attackers == 0
    assert parse_run_config({"malicious-fraction": 0.3}).num_attackers == 3
