"""Re-decide recorded CLIP-Fed screening under other floors and z thresholds.

Every round of a ``defense=clipfed`` run records, per client, the combined score, the raw
``collapse`` and the client's true role (``metrics.json`` → ``rounds[*].decisions``). This script
replays those decisions under a grid of ``screen-min-collapse`` × ``screen-z-thr`` values and prints
TPR and benign rejections per run, which is how the defaults were chosen for synthesised server sets
(benchmarks/README.md). A replay re-decides the recorded scores only: a real run under other settings
would take another trajectory, so confirm the chosen values with a run.

    python -m benchmarks.replay_screening outputs/run-a/metrics.json outputs/run-b/metrics.json \
        --floors 0.1,0.15,0.2 --z 2.5,3.0 --json replay.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def load_decisions(path: str | Path) -> list[dict[str, Any]]:
    """All client decisions of a run that carry a combined score and a raw collapse."""
    data = json.loads(Path(path).read_text())
    rows = []
    for r in data.get("rounds", []):
        for d in (r.get("decisions") or {}).values():
            collapse = (d.get("screening") or {}).get("collapse")
            if d.get("score") is None or collapse is None:
                continue
            rows.append({"round": r["round"], "malicious": bool(d["malicious"]), "score": float(d["score"]),
                         "collapse": float(collapse)})
    if not rows:
        raise ValueError(f"{path}: no screening decisions with raw collapse values (a defense=clipfed run "
                         "recorded by clipfed ≥ session 2 is needed)")
    return rows


def replay(rows: list[dict[str, Any]], floor: float, z_thr: float) -> dict[str, Any]:
    """TPR / FPR when each round is re-decided by :func:`clipfed_strategy.screening.decide` (rule
    ``mad``: flagged iff ``score > z_thr`` and ``collapse ≥ floor``).

    The reject cap and minimum-kept fail-safes are switched off (they rarely bind with 20 %
    attackers), so every client over both bars counts as flagged."""
    import torch

    from clipfed_strategy.screening import decide

    by_round: dict[int, list[dict[str, Any]]] = {}
    for d in rows:
        by_round.setdefault(d["round"], []).append(d)
    tp = fn = fp = tn = 0
    for ds in by_round.values():
        decision = decide(torch.tensor([d["score"] for d in ds]), rule="mad", z_thr=z_thr,
                          collapse=torch.tensor([d["collapse"] for d in ds]), min_collapse=floor,
                          max_reject_frac=1.0, min_kept=0, min_clients=0)
        for d, flag in zip(ds, decision.flagged.tolist()):
            if d["malicious"]:
                tp, fn = tp + flag, fn + (not flag)
            else:
                fp, tn = fp + flag, tn + (not flag)
    return {"floor": floor, "z_thr": z_thr, "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "tpr": tp / (tp + fn) if tp + fn else None, "fpr": fp / (fp + tn) if fp + tn else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="+", help="metrics.json files of defense=clipfed runs")
    ap.add_argument("--floors", type=_floats, default=[0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--z", type=_floats, default=[2.5, 3.0, 3.5])
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    try:
        runs = {str(p): load_decisions(p) for p in args.metrics}
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = []
    print("| floor / z | " + " | ".join(Path(p).parent.name for p in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for floor in args.floors:
        for z in args.z:
            cells = []
            for p, rows in runs.items():
                res = replay(rows, floor, z)
                table.append({"run": p, **res})
                tpr = "–" if res["tpr"] is None else f"{res['tpr']:.2f}"
                cells.append(f"TPR {tpr}, benign rejected {res['fp']}/{res['fp'] + res['tn']}")
            print(f"| {floor} / {z} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
