"""What one post-aggregation distillation does to a given global model: MA and ASR before and after.

Usage::

    python -m benchmarks.distill_lab <run>/checkpoint.pt [key=value ...] [--rounds 3] [--eval-size 2000]
        [--out lab.json]

Takes a run's round checkpoint (any defence, e.g. FedAvg under BadNets: a backdoored model), rebuilds
that run's CLIP-Fed setup from its ``metrics.json`` config plus the ``key=value`` overrides (any
``distill-*``, ``sds-*`` or other run-config key; ``defense`` is set to ``clipfed``), then applies
``CLIPFedDefense.distill`` ``--rounds`` times in a row, with no client training in between, and
measures MA and ASR on a fixed ``--eval-size`` subset of the test set (the same subset as the
runs' ``eval-size``) after each. Seconds per distillation are reported too. This is how the
session-3 distillation defaults were chosen (benchmarks/README.md): a removal-versus-damage
measurement that takes seconds instead of a 20-round federation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fltask.config import parse_run_config
from fltask.datasets import load_task_data
from fltask.models import build_model
from fltask.partition import make_split
from fltask.training import attack_success_rate, clean_target_rate, main_accuracy, predict
from server_app.app import asr_trigger, eval_subset
from server_app.clipfed_setup import build_clipfed
from server_app.inprocess import default_run_config, parse_overrides
from server_app.strategies import common_kwargs

log = logging.getLogger("benchmarks.distill_lab")


class LabError(ValueError):
    """A checkpoint or override the lab cannot use."""


def run_config_of(checkpoint: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's config (from the ``metrics.json`` next to the checkpoint) with the overrides applied."""
    metrics = checkpoint.parent / "metrics.json"
    if not checkpoint.is_file():
        raise LabError(f"no checkpoint at {checkpoint} (run with checkpoint = true, the default)")
    if not metrics.is_file():
        raise LabError(f"no metrics.json next to {checkpoint}: the lab needs the run's config")
    # keys added to the project after the run was recorded take today's defaults
    config = {**default_run_config(), **json.loads(metrics.read_text())["config"]}
    unknown = [k for k in overrides if k not in config]
    if unknown:
        raise LabError(f"unknown run-config key(s) {unknown}; see pyproject.toml [tool.flwr.app.config]")
    config.update(overrides)
    config["defense"] = "clipfed"
    return config


def lab(checkpoint: str | Path, overrides: dict[str, Any] | None = None, rounds: int = 3,
        eval_size: int = 2000) -> dict[str, Any]:
    """Distil the checkpoint's global model ``rounds`` times; returns MA/ASR after each."""
    checkpoint = Path(checkpoint)
    cfg = parse_run_config(run_config_of(checkpoint, overrides or {}))
    data = load_task_data(cfg)
    split = make_split(cfg, data)
    h, _, c = data.image_shape
    model = build_model(cfg.model, c, data.num_classes, h)
    built = build_clipfed(cfg, model, data, split, common_kwargs(cfg))
    defense = built.strategy.defense
    x_test, y_test = eval_subset(data.x_test, data.y_test, eval_size)  # the same fixed subset as the runs'
    spec = asr_trigger(cfg, h)
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in torch.load(checkpoint, weights_only=False)["arrays"].items()}
    model.load_state_dict(state)
    def evaluate() -> dict[str, float]:
        pred = predict(model, x_test)
        return {"ma": main_accuracy(model, x_test, y_test, pred), "asr": attack_success_rate(model, x_test, y_test, spec),
                "clean_target_rate": clean_target_rate(model, x_test, y_test, spec, pred)}

    steps = [{"distillations": 0, **evaluate(), "seconds": 0.0}]
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        state, stats = defense.distill(r, state)
        seconds = time.perf_counter() - t0
        model.load_state_dict(state)
        steps.append({"distillations": r, **evaluate(), "seconds": seconds,
                      "losses": {k: v for k, v in stats.items() if k in ("ce", "kl", "pcl", "self", "total", "self_gated")}})
    return {"checkpoint": str(checkpoint), "overrides": overrides or {}, "teacher": defense.teacher_info["label"],
            "server_rows": int(len(defense.y)), "eval_size": int(len(y_test)), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_lab", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--rounds", type=int, default=3, help="distillations in a row (default 3)")
    p.add_argument("--eval-size", type=int, default=2000, help="fixed test subset for MA/ASR (default 2000)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.overrides, known=default_run_config())
    except ValueError as err:
        p.error(str(err))
    try:
        result = lab(args.checkpoint, overrides, args.rounds, args.eval_size)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    line = " ".join(f"{s['distillations']}: MA {100 * s['ma']:.1f} ASR {100 * s['asr']:.1f} (floor {100 * s['clean_target_rate']:.1f})"
                    for s in result["steps"])
    print(f"{' '.join(args.overrides) or '(defaults)'} | {line} | {result['steps'][-1]['seconds']:.1f}s per distillation"
          f" | {result['server_rows']} server rows, {result['teacher']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
