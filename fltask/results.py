"""Results of a run: ``metrics.json`` (config + one entry per round), ``metrics.csv``, ``curves.png``."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "round", "ma", "asr", "train_loss", "num_replies", "num_failures", "num_rejected", "tpr", "fpr",
    "seconds_train", "seconds_server", "seconds_eval",
)


def detection_rates(decisions: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    """TPR and FPR of a round's detections (rejected, or flagged and purified: ``screen-purify``)
    against the clients' ground-truth roles."""
    mal = [d for d in decisions.values() if d.get("malicious") is True]
    ben = [d for d in decisions.values() if d.get("malicious") is False]
    tpr = sum(d["rejected"] or d.get("purified", False) for d in mal) / len(mal) if mal else None
    fpr = sum(d["rejected"] or d.get("purified", False) for d in ben) / len(ben) if ben else None
    return tpr, fpr


class RunRecorder:
    """Collects per-round metrics and rewrites the three result files after every round."""

    def __init__(self, out_dir: Path, config: dict[str, Any], header: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.header = header or {}
        self.rounds: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        self.rounds = [r for r in self.rounds if r["round"] != entry["round"]] + [entry]
        self.rounds.sort(key=lambda r: r["round"])
        self.write()

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Take over the rounds of a checkpoint (resume)."""
        self.rounds = list(rounds)
        self.write()

    def write(self) -> None:
        doc = {**self.header, "config": self.config, "rounds": self.rounds}
        _atomic_write(self.out_dir / "metrics.json", json.dumps(doc, indent=2, default=_json_default))
        tmp = self.out_dir / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rounds:
                w.writerow({k: r.get(k) for k in CSV_FIELDS})
        os.replace(tmp, self.out_dir / "metrics.csv")

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, [100 * r["ma"] for r in self.rounds], "o-", label="MA (clean accuracy)")
        ax.plot(rounds, [100 * _nan(r["asr"]) for r in self.rounds], "s-", label="ASR (attack success)")
        ax.set_xlabel("round")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend()
        teacher = self.header.get("teacher", {}).get("label")
        title = self.header.get("run_name", "")
        ax.set_title(f"{title}\n{teacher}" if teacher else title, fontsize=8)
        fig.tight_layout()
        path = self.out_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def clean_float(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
