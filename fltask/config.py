"""The run configuration, parsed and validated once at start.

Flower hands apps a flat ``run_config`` dict of scalars (kebab-case keys from ``pyproject.toml``
``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``). :func:`parse_run_config`
turns it into a typed :class:`RunConfig`; nothing else reads the raw dict. Unknown values fail
here, with a :class:`ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DATASETS = ("digits", "cifar10", "cifar10-lt")
DATASET_SOURCES = ("auto", "npz", "folder", "flwr-datasets")
PARTITIONS = ("dirichlet", "iid")
MODELS = ("cnn", "resnet8", "resnet18")
ATTACKS = ("none", "badnets", "blend", "dba")
ATTACKER_SAMPLING = ("fixed", "per-round")
TRIGGER_PATTERNS = ("checkerboard", "white", "random")
TRIGGER_POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
BLEND_PATTERNS = ("noise", "stripes")
DEFENSES = (
    "fedavg",
    "krum",
    "multikrum",
    "median",
    "trimmedmean",
    "bulyan",
    "clipfed",
    "flame",
    "fltrust",
    "foolsgold",
    "rlr",
    "oracle",
)


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or outside its allowed values."""


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key of the federated task (kebab-case key = field name with '-')."""

    # federation
    num_server_rounds: int = 20
    num_clients: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    local_epochs: int = 2
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    # data
    dataset: str = "digits"
    dataset_source: str = "auto"
    dataset_path: str = ""
    partition: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    lt_imbalance: float = 100.0
    heldout_size: int = 300
    test_size: int = 360
    eval_size: int = 0
    max_train_per_client: int = 0
    # model
    model: str = "cnn"
    # attack
    attack: str = "badnets"
    attack_target: int = 0
    poison_rate: float = 0.5
    attack_start_round: int = 1
    trigger_size: int = 0
    trigger_position: str = "bottom-right"
    trigger_pattern: str = "checkerboard"
    blend_alpha: float = 0.2
    blend_pattern: str = "noise"
    dba_parts: int = 4
    boost_factor: float = 1.0
    pgd_radius: float = 0.0
    neurotoxin_topk: float = 0.0
    malicious_ids: str = ""
    malicious_fraction: float = 0.2
    attacker_sampling: str = "fixed"
    # server
    defense: str = "fedavg"
    krum_num_malicious: int = -1
    trimmed_beta: float = 0.2
    seed: int = 0
    results_dir: str = "outputs"
    run_name: str = ""
    cache_dir: str = ""
    round_timeout: float = 600.0
    checkpoint: bool = True
    resume: bool = False
    # every key not owned by the task (e.g. "clipfed.*", "flame.*") is kept for its owner
    extra: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ derived
    @property
    def malicious_id_set(self) -> frozenset[int]:
        return frozenset(int(x) for x in self.malicious_ids.split(",") if x.strip())

    @property
    def num_attackers(self) -> int:
        if self.attack == "none":
            return 0
        if self.malicious_id_set:
            return len(self.malicious_id_set)
        return int(round(self.malicious_fraction * self.num_clients))

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        alpha = f"a{self.alpha:g}" if self.partition == "dirichlet" else "iid"
        return f"{self.dataset}_{self.model}_{alpha}_{self.attack}_{self.defense}_s{self.seed}"

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir).expanduser().resolve() / self.resolved_run_name

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        return Path("~/.cache/clipfed").expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        out = {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


_CHOICES = {
    "dataset": DATASETS,
    "dataset_source": DATASET_SOURCES,
    "partition": PARTITIONS,
    "model": MODELS,
    "attack": ATTACKS,
    "attacker_sampling": ATTACKER_SAMPLING,
    "trigger_pattern": TRIGGER_PATTERNS,
    "trigger_position": TRIGGER_POSITIONS,
    "blend_pattern": BLEND_PATTERNS,
    "defense": DEFENSES,
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    key = _key(name)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config key '{key}' must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"run-config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config key '{key}' must be a number, got {value!r}")
        return float(value)
    if name == "malicious_ids" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `--run-config malicious-ids=3` arrives as a TOML integer
    if not isinstance(value, str):
        raise ConfigError(f"run-config key '{key}' must be a string, got {value!r}")
    return value


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from Flower's flat run-config dict."""
    defaults = RunConfig()
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"extra"}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in names:
            kwargs[name] = _coerce(name, value, getattr(defaults, name))
        else:
            extra[key] = value
    cfg = RunConfig(**kwargs, extra=extra)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key."""
    for name, allowed in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(
                f"run-config key '{_key(name)}' is {value!r}; allowed values: {', '.join(allowed)}"
            )

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"run-config key '{key}' {what}, got {getattr(cfg, key.replace('-', '_'))!r}")

    need(cfg.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
    need(cfg.num_clients >= 1, "num-clients", "must be >= 1")
    need(0.0 < cfg.fraction_train <= 1.0, "fraction-train", "must lie in (0, 1]")
    need(0.0 <= cfg.fraction_evaluate <= 1.0, "fraction-evaluate", "must lie in [0, 1]")
    need(cfg.local_epochs >= 1, "local-epochs", "must be >= 1")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.batch_size >= 1, "batch-size", "must be >= 1")
    need(cfg.alpha > 0, "alpha", "must be > 0 (Dirichlet concentration)")
    need(cfg.lt_imbalance >= 1, "lt-imbalance", "must be >= 1 (max/min class size)")
    need(cfg.heldout_size >= 0, "heldout-size", "must be >= 0")
    need(cfg.test_size >= 1, "test-size", "must be >= 1")
    need(cfg.eval_size >= 0, "eval-size", "must be >= 0 (0 = the whole test set)")
    need(0.0 <= cfg.poison_rate <= 1.0, "poison-rate", "must lie in [0, 1]")
    need(0 <= cfg.attack_target < 10, "attack-target", "must be a class index in 0..9")
    need(cfg.trigger_size >= 0, "trigger-size", "must be >= 0 (0 = auto)")
    need(0.0 < cfg.blend_alpha <= 1.0, "blend-alpha", "must lie in (0, 1]")
    need(cfg.dba_parts in (2, 4), "dba-parts", "must be 2 or 4")
    need(cfg.boost_factor >= 1.0, "boost-factor", "must be >= 1 (1 = no model replacement)")
    need(cfg.pgd_radius >= 0.0, "pgd-radius", "must be >= 0 (0 = off)")
    need(0.0 <= cfg.neurotoxin_topk < 1.0, "neurotoxin-topk", "must lie in [0, 1) (0 = off)")
    need(0.0 <= cfg.malicious_fraction <= 1.0, "malicious-fraction", "must lie in [0, 1]")
    need(0.0 <= cfg.trimmed_beta < 0.5, "trimmed-beta", "must lie in [0, 0.5)")
    need(cfg.round_timeout > 0, "round-timeout", "must be > 0 seconds")
    try:
        ids = cfg.malicious_id_set
    except ValueError:
        raise ConfigError(
            f"run-config key 'malicious-ids' must be comma-separated integers like \"0,3\", got {cfg.malicious_ids!r}"
        ) from None
    bad = sorted(i for i in ids if not 0 <= i < cfg.num_clients)
    if bad:
        raise ConfigError(
            f"run-config key 'malicious-ids' has ids {bad} out of range: partition ids are 0..{cfg.num_clients - 1} "
            f"(num-clients={cfg.num_clients})"
        )
    if cfg.dataset_source in ("npz", "folder") and not cfg.dataset_path:
        raise ConfigError(f"run-config key 'dataset-path' must be set when dataset-source is '{cfg.dataset_source}'")
    if cfg.dataset_path and not Path(cfg.dataset_path).expanduser().exists():
        raise ConfigError(f"run-config key 'dataset-path' points at {cfg.dataset_path!r}, which does not exist")
