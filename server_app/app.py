"""ServerApp (Flower Message API): strategy by ``defense``, central MA/ASR every round, results files."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fltask.attacks import TriggerSpec
from fltask.config import RunConfig, parse_run_config
from fltask.datasets import load_task_data
from fltask.models import build_model
from fltask.partition import make_split
from fltask.results import RunRecorder, detection_rates
from fltask.training import attack_success_rate, clean_target_rate, main_accuracy, predict, to_tensor
from server_app.loop import CHECKPOINT, run_rounds, wait_for_nodes
from server_app.recording_grid import RecordingGrid
from server_app.strategies import build_strategy

log = logging.getLogger("clipfed")
app = ServerApp()


def asr_trigger(cfg: RunConfig, image_size: int) -> TriggerSpec:
    """The trigger ASR is measured with; with ``attack=none`` the BadNets patch (a clean reference)."""
    if cfg.attack == "none":
        from dataclasses import replace

        return replace(TriggerSpec.from_config(cfg, image_size), kind="badnets")
    return TriggerSpec.from_config(cfg, image_size)


def eval_subset(x_test: np.ndarray, y_test: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set as tensors, or a fixed, seed-independent subset of ``size`` images when
    0 < size < its length (run-config ``eval-size``: faster benchmarks, the same images every run)."""
    x, y = to_tensor(x_test), torch.from_numpy(y_test)
    if 0 < size < len(y):
        keep = torch.from_numpy(np.random.default_rng(12345).permutation(len(y))[:size])
        x, y = x[keep], y[keep]
    return x, y


class RoundReporter:
    """``evaluate_fn`` for ``Strategy.start``: MA/ASR on the test set + one results entry per round."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, grid: RecordingGrid, strategy: Any,
                 recorder: RunRecorder, x_test: torch.Tensor, y_test: torch.Tensor, spec: TriggerSpec) -> None:
        self.cfg, self.model, self.grid, self.strategy = cfg, model, grid, strategy
        self.recorder, self.x_test, self.y_test, self.spec = recorder, x_test, y_test, spec

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t_eval = time.perf_counter()
        seconds_server = (t_eval - self.grid.last_return) if server_round > 0 and self.grid.last_return else 0.0
        self.model.load_state_dict(arrays.to_torch_state_dict())
        pred = predict(self.model, self.x_test)  # one clean pass for MA and the ASR's floor
        ma = main_accuracy(self.model, self.x_test, self.y_test, pred=pred)
        asr = attack_success_rate(self.model, self.x_test, self.y_test, self.spec)
        entry: dict[str, Any] = {"round": server_round, "ma": ma, "asr": asr,
                                 "clean_target_rate": clean_target_rate(self.model, self.x_test, self.y_test, self.spec,
                                                                        pred=pred)}
        if server_round > 0:
            replies = self.grid.last_replies
            losses = [(r["train_loss"], r["num_examples"] or 0) for r in replies.values() if r["train_loss"] is not None]
            n = sum(w for _, w in losses)
            entry["train_loss"] = sum(l * w for l, w in losses) / n if n else None
            entry["num_replies"] = sum(not r["error"] for r in replies.values())
            entry["num_failures"] = sum(bool(r["error"]) for r in replies.values())
            entry["seconds_train"] = self.grid.last_seconds
            entry["seconds_server"] = seconds_server
            invalid = getattr(self.strategy, "guard_rejected", None)
            if invalid:
                entry["invalid_replies"] = {str(k): v for k, v in invalid.items()}
            report = getattr(self.strategy, "last_round_report", None) or {}
            if report:
                decisions = decisions_with_roles(report, replies)
                entry["decisions"] = decisions
                entry["num_rejected"] = sum(d["rejected"] for d in decisions.values())
                entry["tpr"], entry["fpr"] = detection_rates(decisions)
                entry["defense"] = {k: v for k, v in report.items() if k not in ("accepted", "rejected", "scores", "reasons")}
            entry["attackers"] = sorted(r["partition_id"] for r in replies.values() if r["malicious"])
        entry["seconds_eval"] = time.perf_counter() - t_eval
        self.recorder.add(entry)
        log.info(
            "round %3d | MA %5.1f%% | ASR %5.1f%% | loss %s | rejected %s | train %.1fs server %.1fs",
            server_round, 100 * ma, 100 * asr, _fmt(entry.get("train_loss")), entry.get("num_rejected", "-"),
            entry.get("seconds_train", 0.0), entry.get("seconds_server", 0.0),
        )
        return MetricRecord({"ma": ma, "asr": asr})


def decisions_with_roles(report: dict[str, Any], replies: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per client: the defence's decision joined with the ground truth the metrics code holds."""
    rejected = {int(n) for n in report.get("rejected", [])}
    purified = {int(n) for n in report.get("purified", [])}
    scores = {int(k): v for k, v in report.get("scores", {}).items()}
    reasons = {int(k): v for k, v in report.get("reasons", {}).items()}
    details = {int(k): v for k, v in report.get("screening", {}).items()}
    out = {}
    for node_id, r in replies.items():
        if r["error"]:
            continue
        out[str(node_id)] = {
            "partition_id": r["partition_id"],
            "malicious": r["malicious"],
            "rejected": node_id in rejected,
            "purified": node_id in purified,
            "score": scores.get(node_id),
            "reason": reasons.get(node_id, ""),
        }
        if node_id in details:
            out[str(node_id)]["screening"] = details[node_id]
    return out


def config_key(cfg: RunConfig) -> str:
    """Identifies a run's configuration (all keys but ``resume``) for checkpoint compatibility."""
    import hashlib
    import json

    conf = {k: v for k, v in cfg.to_dict().items() if k != "resume"}
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def configure_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        for name in ("clipfed", "fltask", "server_app", "clipfed_strategy", "data_synth"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.INFO)
            if not lg.handlers:
                lg.addHandler(h)
            lg.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = parse_run_config(context.run_config)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = load_task_data(cfg)
    split = make_split(cfg, data)
    h, _, c = data.image_shape
    model = build_model(cfg.model, c, data.num_classes, h)
    log.info(
        "run %s: %s (%s), %d clients (%s), model %s, attack %s, defense %s, %d rounds; results -> %s",
        cfg.resolved_run_name, cfg.dataset, data.source, cfg.num_clients,
        f"dirichlet a={cfg.alpha}" if cfg.partition == "dirichlet" else "iid", cfg.model, cfg.attack,
        cfg.defense, cfg.num_server_rounds, cfg.results_path,
    )
    built = build_strategy(cfg, model, data, split)
    header = {"run_name": cfg.resolved_run_name, "dataset_source": data.source, "status": "running", **built.header}
    recorder = RunRecorder(cfg.results_path, cfg.to_dict(), header)
    rgrid = RecordingGrid(grid)
    x_test, y_test = eval_subset(data.x_test, data.y_test, cfg.eval_size)
    reporter = RoundReporter(cfg, model, rgrid, built.strategy, recorder, x_test, y_test, asr_trigger(cfg, h))
    t0 = time.perf_counter()
    try:
        wait_for_nodes(rgrid, cfg.num_clients, cfg.round_timeout)
        run_rounds(
            built.strategy, rgrid, ArrayRecord(model.state_dict()), cfg.num_server_rounds, reporter,
            timeout=cfg.round_timeout,
            checkpoint_path=cfg.results_path / CHECKPOINT if cfg.checkpoint else None,
            resume=cfg.resume, config_key=config_key(cfg),
            rounds_so_far=lambda: recorder.rounds, restore_rounds=recorder.restore,
        )
    except BaseException as err:
        recorder.header["status"] = "failed"
        recorder.header["error"] = f"{type(err).__name__}: {err}"
        recorder.write()
        raise
    recorder.header["status"] = "completed"
    recorder.header["seconds_total"] = time.perf_counter() - t0
    recorder.write()
    png = recorder.plot()
    final = recorder.rounds[-1]
    log.info("finished %s: MA %.1f%% ASR %.1f%%; wrote %s, metrics.csv, %s", cfg.resolved_run_name,
             100 * final["ma"], 100 * final["asr"], cfg.results_path / "metrics.json", png.name)
