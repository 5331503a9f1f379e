"""Defence × attack comparison: run a grid of federations, resume when interrupted, write one table.

Usage::

    python -m benchmarks.compare --grid benchmarks/grids/cpu.toml [--out benchmarks/results/cpu]
        [--jobs 1] [--threads N] [--only defense=clipfed,flame] [--only alpha=0.5]
        [--dry-run] [--table-only] [--cell-timeout SECONDS] [--retries 1]

What runs
    Every cell is one federation run through :func:`server_app.inprocess.run_inprocess`: the
    project's real ServerApp (``server_app.app``) and ClientApp (``client_app.app``) functions,
    i.e. the same code ``flwr run`` executes, with the ClientApp called node after node in the
    same process instead of through a SuperLink and Ray (no transport, identical maths and
    results files). Each cell runs in a fresh Python subprocess (a crash or an out-of-memory kill
    loses that cell only) whose output goes to ``<out>/logs/<cell>.log``.

Resume
    A cell whose ``metrics.json`` says ``status: completed`` (with the grid's settings) is skipped.
    An interrupted cell restarts from its last per-round checkpoint (``resume = true``). Rerunning
    the same command after a kill therefore loses at most one round per running cell.

Grid file (TOML)
    ``[base]``: run-config overrides for every cell (kebab-case keys of ``pyproject.toml``
    ``[tool.flwr.app.config]``, e.g. ``attacker-sampling``, ``neurotoxin-topk``). ``[grid]``: axes,
    ``key = [values]``; the cells are their cartesian product. ``[runner]`` (optional):
    ``baseline = true`` adds one ``defense = "fedavg", attack = "none"`` cell per value of the other
    axes (the clean MA reference); ``keep-checkpoints = false`` deletes a cell's checkpoint once it
    has completed. Relative ``dataset-path``, ``sds-path`` and ``cache-dir`` are resolved against the
    repository root. ``results-dir``, ``run-name``, ``resume`` and ``checkpoint`` belong to the runner.

Outputs in ``--out`` (default ``benchmarks/results/<grid name>``)
    ``cells/<cell>/`` (each run's ``metrics.json``, ``metrics.csv``, ``curves.png``), ``logs/``,
    ``table.md`` and ``table.csv`` (one row per defence × attack × other axes: final MA and ASR as
    mean ± sample std over seeds, ΔMA against clean FedAvg, detection TPR/FPR averaged over the
    rounds that had attackers, server seconds per round), ``summary.json`` and ``summary.png``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PATH_KEYS = ("dataset-path", "sds-path", "cache-dir")
RUNNER_KEYS = ("results-dir", "run-name", "resume", "checkpoint")
BASELINE = {"defense": "fedavg", "attack": "none"}
SECTIONS = ("runner", "base", "grid")
RUNNER_OPTIONS = {"baseline": True, "keep-checkpoints": False}

log = logging.getLogger("benchmarks.compare")


class GridError(ValueError):
    """The grid file is malformed or names something that does not exist."""


# ---------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Cell:
    """One federation of the grid: its axis values, run-config overrides and directory name."""

    name: str
    axes: dict[str, Any]
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    path: Path
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    options: dict[str, Any] = field(default_factory=lambda: dict(RUNNER_OPTIONS))

    @property
    def name(self) -> str:
        return self.path.stem

    def cells(self) -> list[Cell]:
        """Baseline cells first (one per value of the non-defence/attack axes), then the product."""
        keys = list(self.axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*self.axes.values())]
        out: dict[str, Cell] = {}
        if self.options["baseline"]:
            for combo in combos:
                axes = {**BASELINE, **{k: v for k, v in combo.items() if k not in BASELINE}}
                cell = self._cell(axes)
                out.setdefault(cell.name, cell)
        for combo in combos:
            cell = self._cell(combo)
            out.setdefault(cell.name, cell)
        return list(out.values())

    def _cell(self, axes: dict[str, Any]) -> Cell:
        return Cell(cell_name(axes), dict(axes), {**self.base, **axes})


def cell_name(axes: dict[str, Any]) -> str:
    """Directory name of a cell: ``fedavg_badnets_a0.5_s0`` (defence, attack, then the other axes)."""
    short = {"alpha": "a", "seed": "s"}
    parts = [str(axes[k]) for k in ("defense", "attack") if k in axes]
    parts += [f"{short.get(k, k + '-')}{_fmt_value(v)}" for k, v in axes.items() if k not in ("defense", "attack")]
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", "_".join(parts))


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file; relative paths in it are resolved against the repository root."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise GridError(f"{path}: unknown sections {unknown}; allowed: {', '.join(SECTIONS)}")
    options = dict(RUNNER_OPTIONS)
    for key, value in doc.get("runner", {}).items():
        if key not in RUNNER_OPTIONS:
            raise GridError(f"{path}: [runner] key '{key}' is unknown; allowed: {', '.join(RUNNER_OPTIONS)}")
        if not isinstance(value, bool):
            raise GridError(f"{path}: [runner] key '{key}' must be true or false, got {value!r}")
        options[key] = value
    base = dict(doc.get("base", {}))
    axes = dict(doc.get("grid", {}))
    if not axes:
        raise GridError(f"{path}: [grid] is empty; give at least one axis, e.g. defense = [\"fedavg\", \"flame\"]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values or any(isinstance(v, (list, dict)) for v in values):
            raise GridError(f"{path}: [grid] key '{key}' must be a non-empty list of scalars, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise GridError(f"{path}: [grid] key '{key}' lists a value twice: {values!r}")
    for key in RUNNER_KEYS:
        if key in base or key in axes:
            raise GridError(f"{path}: '{key}' is set by the runner (per cell); remove it from the grid file")
    for key in set(base) & set(axes):
        raise GridError(f"{path}: '{key}' is both in [base] and in [grid]; keep one")
    base = {k: _resolve_path(path, k, v) for k, v in base.items()}
    axes = {k: [_resolve_path(path, k, v) for v in vs] for k, vs in axes.items()}
    return Grid(path.resolve(), base, axes, options)


def _resolve_path(grid: Path, key: str, value: Any) -> Any:
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    resolved = (p if p.is_absolute() else PROJECT_ROOT / p).resolve()
    if key != "cache-dir" and not resolved.exists():
        hint = (" (CIFAR-10 as an .npz with arrays x_train, y_train, x_test, y_test; see fltask/datasets.py)"
                if key == "dataset-path" else "")
        raise GridError(
            f"{grid}: '{key}' = {value!r} resolves to {resolved}, which does not exist{hint}. "
            f"Relative paths are taken from the repository root {PROJECT_ROOT}; edit the grid file or put the file there."
        )
    return str(resolved)


def check_cells(cells: Iterable[Cell]) -> None:
    """Parse every cell's run-config now, so a bad value fails before hours of runs, not in the middle."""
    from fltask.config import ConfigError, parse_run_config
    from server_app.inprocess import default_run_config

    defaults = default_run_config()
    for cell in cells:
        unknown = sorted(k for k in cell.overrides if k not in defaults)
        if unknown:
            raise GridError(f"cell {cell.name}: unknown run-config keys {unknown} (see pyproject.toml [tool.flwr.app.config])")
        try:
            parse_run_config({**defaults, **cell.overrides})
        except ConfigError as err:
            raise GridError(f"cell {cell.name}: {err}") from None


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Keep the cells matching every ``key=v1,v2`` filter (a cell without that axis uses its override)."""
    for spec in only:
        if "=" not in spec:
            raise GridError(f"--only expects key=value[,value...], got {spec!r}")
        key, _, values = spec.partition("=")
        wanted = [v.strip() for v in values.split(",") if v.strip()]
        cells = [c for c in cells if key in c.overrides and any(_same(c.overrides[key], w) for w in wanted)]
    return cells


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


# ---------------------------------------------------------------------------- running cells
def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.name


def cell_status(out: Path, cell: Cell) -> str:
    """``completed`` (finished with these settings), ``stale`` (finished with others), ``partial`` or ``todo``."""
    doc = read_metrics(cell_dir(out, cell) / "metrics.json")
    if doc is None:
        return "todo"
    if doc.get("status") != "completed":
        return "partial"
    config = doc.get("config", {})
    if all(k in config and _same(config[k], v) for k, v in cell.overrides.items()):
        return "completed"
    return "stale"


def read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_cell(spec: dict[str, Any]) -> None:
    """Body of a cell subprocess: one federation through the real ServerApp/ClientApp code."""
    import faulthandler

    import torch

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the runner asks for stacks before killing a hung cell
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    client_log = logging.getLogger("client_app")  # the ServerApp configures its own loggers; flwr has its own
    client_log.addHandler(handler)
    client_log.setLevel(logging.INFO)
    torch.set_num_threads(int(spec["threads"]))
    from server_app.inprocess import run_inprocess

    path = run_inprocess(spec["overrides"])
    if not spec.get("keep_checkpoints", False):
        from server_app.loop import CHECKPOINT

        (path / CHECKPOINT).unlink(missing_ok=True)


def launch(out: Path, cell: Cell, threads: int, keep_checkpoints: bool, timeout: float | None) -> dict[str, Any]:
    """Run one cell in a fresh subprocess; returns what happened (status, seconds, log file)."""
    overrides = {**cell.overrides, "results-dir": str(out / "cells"), "run-name": cell.name,
                 "checkpoint": True, "resume": True}
    spec = {"overrides": overrides, "threads": threads, "keep_checkpoints": keep_checkpoints}
    log_path = out / "logs" / f"{cell.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_path, "a") as logf:
        logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {cell.name}: {json.dumps(overrides)}\n")
        logf.flush()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.compare", "--cell", json.dumps(spec)],
                                cwd=PROJECT_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            proc.send_signal(signal.SIGUSR1)  # every thread's stack into the cell's log, then kill
            time.sleep(2)
            proc.kill()
            proc.wait()
            logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {cell.name}: killed after {timeout:.0f}s\n")
    seconds = time.perf_counter() - t0
    status = cell_status(out, cell)
    ok = rc == 0 and status == "completed"
    return {"cell": cell.name, "status": "completed" if ok else "failed", "returncode": rc,
            "seconds": seconds, "log": str(log_path)}


def run_grid(out: Path, cells: list[Cell], jobs: int = 1, threads: int | None = None, keep_checkpoints: bool = False,
             timeout: float | None = None, retries: int = 1) -> list[dict[str, Any]]:
    """Run every cell that is not completed yet, ``jobs`` at a time; returns one record per cell.

    A cell that runs past ``timeout`` seconds has its stacks dumped into its log, is killed, and is
    relaunched up to ``retries`` times; it resumes from its last round checkpoint."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    records: list[dict[str, Any]] = []
    todo = []
    for cell in cells:
        status = cell_status(out, cell)
        if status == "completed":
            log.info("skip %s: completed", cell.name)
            records.append({"cell": cell.name, "status": "skipped"})
        elif status == "stale":
            raise GridError(
                f"{cell_dir(out, cell)} holds a completed run with other settings than the grid's; "
                "use another --out, or delete that directory to rerun it"
            )
        else:
            todo.append(cell)
    if todo:
        log.info("running %d cells (%d skipped), %d at a time with %d torch threads each",
                 len(todo), len(cells) - len(todo), jobs, threads)

    def one(cell: Cell) -> dict[str, Any]:
        log.info("start %s", cell.name)
        rec = launch(out, cell, threads, keep_checkpoints, timeout)
        for attempt in range(retries):
            if rec["returncode"] != "timeout":
                break
            log.warning("%s timed out after %.0fs: resuming it from its last round checkpoint (retry %d of %d)",
                        cell.name, rec["seconds"], attempt + 1, retries)
            rec = launch(out, cell, threads, keep_checkpoints, timeout)
        summary = summarize_run(read_metrics(cell_dir(out, cell) / "metrics.json") or {})
        if rec["status"] == "completed":
            log.info("done  %s in %.0fs: MA %s ASR %s", cell.name, rec["seconds"], _pct(summary.get("ma")),
                     _pct(summary.get("asr")))
        else:
            log.error("FAILED %s (exit %s) after %.0fs: see %s", cell.name, rec["returncode"], rec["seconds"], rec["log"])
        return rec

    completed = [c for c in cells if c not in todo]
    first = teacher_builders(todo, built=completed) if jobs > 1 else []
    if first:
        log.info("running %s alone first: it builds the cached teacher and server dataset the others reuse",
                 ", ".join(c.name for c in first))
        records.extend(one(c) for c in first)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        records.extend(pool.map(one, [c for c in todo if c not in first]))
    return records


TEACHER_DEFENSES = ("clipfed", "fltrust")
TEACHER_CACHE_KEYS = ("dataset", "dataset-path", "heldout-size", "cache-dir", "clip-teacher", "clip-model",
                      "clip-pretrained", "sds-path", "sds-generator", "sds-images-per-class")


def _teacher_key(cell: Cell) -> tuple:
    return tuple(repr(cell.overrides.get(k)) for k in TEACHER_CACHE_KEYS)


def teacher_builders(cells: list[Cell], built: Iterable[Cell] = ()) -> list[Cell]:
    """One cell per distinct teacher/server-dataset setting among the cells that need them.

    Run alone before the rest when cells run in parallel, so two cells never train the same
    cached stand-in teacher or synthesise the same server dataset at the same time. Settings of
    which a ``built`` cell (one that has completed) needed the teacher are cached already: skipped.
    """
    done = {_teacher_key(c) for c in built if c.overrides.get("defense") in TEACHER_DEFENSES}
    seen: dict[tuple, Cell] = {}
    for cell in cells:
        key = _teacher_key(cell)
        if cell.overrides.get("defense") in TEACHER_DEFENSES and key not in done:
            seen.setdefault(key, cell)
    return list(seen.values())


# ---------------------------------------------------------------------------- aggregation (pure)
def summarize_run(doc: dict[str, Any]) -> dict[str, Any]:
    """Final MA/ASR, detection rates over rounds with attackers, server seconds per round of one run."""
    rounds = [r for r in doc.get("rounds", []) if r.get("round", 0) > 0]
    attacked = [r for r in rounds if r.get("attackers")]
    last = doc["rounds"][-1] if doc.get("rounds") else {}
    teacher = doc.get("teacher") or {}
    label = teacher.get("label") or teacher.get("identity")
    if label and teacher.get("is_standin") and "label" not in teacher:
        label += " (stand-in teacher, not CLIP)"
    return {
        "status": doc.get("status"),
        "rounds": last.get("round"),
        "ma": _num(last.get("ma")),
        "asr": _num(last.get("asr")),
        "tpr": _mean([_num(r.get("tpr")) for r in attacked]),
        "fpr": _mean([_num(r.get("fpr")) for r in attacked]),
        "server_s": _mean([_num(r.get("seconds_server")) for r in rounds]),
        "seconds_total": _num(doc.get("seconds_total")),
        "teacher": label,
        "teacher_is_standin": teacher.get("is_standin"),
    }


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1) of the values that are not None/NaN.

    No value: (None, None); one value: (value, None).
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def table_rows(docs: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """One row per distinct value of ``columns`` (read from each run's ``config``), seeds pooled.

    Only runs with ``status: completed`` count. ``delta_ma`` is the row's mean MA minus that of the
    ``defense=fedavg, attack=none`` row with the same other columns (None when there is none).
    """
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for doc in docs:
        if doc.get("status") != "completed":
            continue
        config = doc.get("config", {})
        key = tuple(config.get(c) for c in columns)
        groups.setdefault(key, []).append((config, summarize_run(doc)))
    rows = []
    for key, members in groups.items():
        sums = [s for _, s in members]
        ma, ma_sd = mean_std(s["ma"] for s in sums)
        asr, asr_sd = mean_std(s["asr"] for s in sums)
        teachers = sorted({s["teacher"] for s in sums if s["teacher"]})
        rows.append({
            **dict(zip(columns, key)),
            "seeds": sorted(c.get("seed") for c, _ in members),
            "n": len(members),
            "rounds": max((s["rounds"] or 0) for s in sums),
            "ma": ma, "ma_std": ma_sd, "asr": asr, "asr_std": asr_sd,
            "tpr": mean_std(s["tpr"] for s in sums)[0],
            "fpr": mean_std(s["fpr"] for s in sums)[0],
            "server_s": mean_std(s["server_s"] for s in sums)[0],
            "cell_seconds": mean_std(s["seconds_total"] for s in sums)[0],
            "note": "; ".join(teachers),
        })
    by_key = {tuple(r[c] for c in columns): r for r in rows}
    for r in rows:
        ref_key = tuple(BASELINE.get(c, r[c]) for c in columns)
        ref = by_key.get(ref_key)
        r["delta_ma"] = (r["ma"] - ref["ma"]) if ref and ref["ma"] is not None and r["ma"] is not None else None
    return rows


def table_columns(grid: Grid) -> list[str]:
    """Row key: defence, attack, then every other axis but the seed."""
    return ["defense", "attack"] + [k for k in grid.axes if k not in ("defense", "attack", "seed")]


def sort_rows(rows: list[dict[str, Any]], columns: list[str], cells: list[Cell]) -> list[dict[str, Any]]:
    """Grid order: the other axes, then attack (clean reference first), then defence."""
    order: dict[str, dict[Any, int]] = {c: {} for c in columns}
    for cell in cells:
        for c in columns:
            order[c].setdefault(_norm(cell.overrides.get(c)), len(order[c]))
    rest = [c for c in columns if c not in ("defense", "attack")]

    def key(r: dict[str, Any]) -> tuple:
        pos = {c: order[c].get(_norm(r[c]), len(order[c])) for c in columns}
        return tuple(pos[c] for c in rest) + ((-1 if r["attack"] == "none" else pos["attack"]), pos["defense"])

    return sorted(rows, key=key)


def _norm(v: Any) -> Any:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


# ---------------------------------------------------------------------------- writing
def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _mean(values: list[float | None]) -> float | None:
    return mean_std(values)[0]


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def write_tables(out: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """``table.md`` (percentages, mean ± std) and ``table.csv`` (raw fractions)."""
    head = columns + ["seeds", "MA %", "ASR %", "ΔMA vs clean FedAvg (pp)", "TPR %", "FPR %", "server s/round", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = "–" if r["delta_ma"] is None else f"{100 * r['delta_ma']:+.1f}"
        server = "–" if r["server_s"] is None else f"{r['server_s']:.2f}"
        cells = [str(r[c]) for c in columns] + [
            ",".join(map(str, r["seeds"])), _pct(r["ma"], r["ma_std"]), _pct(r["asr"], r["asr_std"]), delta,
            _pct(r["tpr"]), _pct(r["fpr"]), server, _short_note(r["note"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    fields = columns + ["n", "seeds", "rounds", "ma", "ma_std", "asr", "asr_std", "delta_ma", "tpr", "fpr",
                        "server_s", "cell_seconds", "note"]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})


def _short_note(note: str) -> str:
    """The Markdown table's note: a stand-in teacher is named as such (its full identity, with the
    checkpoint path, stays in table.csv and summary.json)."""
    return "STAND-IN teacher (not CLIP)" if "stand-in" in note.lower() else note


def plot_summary(out: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path | None:
    """Bar chart: MA and ASR (mean ± std) per defence, one panel per attack × other axes."""
    attacked = [r for r in rows if r["attack"] != "none"]
    if not attacked:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rest = [c for c in columns if c not in ("defense", "attack")]
    panels: dict[tuple, list[dict]] = {}
    for r in attacked:
        panels.setdefault(tuple(r[c] for c in ["attack"] + rest), []).append(r)
    refs = {tuple(r[c] for c in rest): r["ma"] for r in rows if r["attack"] == "none" and r["defense"] == "fedavg"}
    ncols = min(len({k[0] for k in panels}), 3) or 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (key, members) in zip(axes.flat, panels.items()):
        xs = range(len(members))
        w = 0.4
        ax.bar([x - w / 2 for x in xs], [100 * (m["ma"] or 0) for m in members], w,
               yerr=[100 * (m["ma_std"] or 0) for m in members], label="MA", color="tab:blue")
        ax.bar([x + w / 2 for x in xs], [100 * (m["asr"] or 0) for m in members], w,
               yerr=[100 * (m["asr_std"] or 0) for m in members], label="ASR", color="tab:red")
        ref = refs.get(key[1:])
        if ref is not None:
            ax.axhline(100 * ref, color="tab:blue", ls="--", lw=1, label="clean FedAvg MA")
        ax.set_xticks(list(xs), [m["defense"] for m in members], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(", ".join([str(key[0])] + [f"{c}={v}" for c, v in zip(rest, key[1:])]), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_table(out: Path, grid: Grid, cells: list[Cell]) -> list[dict[str, Any]]:
    """Aggregate the completed cells of the grid found under ``out`` and write the table files."""
    docs = [d for d in (read_metrics(cell_dir(out, c) / "metrics.json") for c in cells) if d is not None]
    columns = table_columns(grid)
    rows = sort_rows(table_rows(docs, columns), columns, cells)
    write_tables(out, rows, columns)
    plot_summary(out, rows, columns)
    return rows


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="grid TOML, e.g. benchmarks/grids/cpu.toml")
    p.add_argument("--out", help="output directory (default: benchmarks/results/<grid name>)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per cell (default: cores // jobs)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                   help="run only the cells with these values (repeatable); the table still covers the whole grid")
    p.add_argument("--cell-timeout", type=float, default=None,
                   help="seconds before a cell is killed, its stacks dumped to its log (default: none)")
    p.add_argument("--retries", type=int, default=1,
                   help="relaunches of a timed-out cell, each resuming from its last round (default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status, run nothing")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from finished cells, run nothing")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: body of a cell subprocess
    args = p.parse_args(argv)
    if not args.cell and not args.grid:
        p.error("--grid is required")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell:
        run_cell(json.loads(args.cell))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    try:
        grid = load_grid(args.grid)
        cells = grid.cells()
        check_cells(cells)
        chosen = select(cells, args.only)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve() if args.out else PROJECT_ROOT / "benchmarks" / "results" / grid.name
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for cell in chosen:
            print(f"{cell_status(out, cell):9s} {cell.name}")
        print(f"{len(chosen)} of {len(cells)} cells selected; output {out}")
        return 0
    records: list[dict[str, Any]] = []
    if not args.table_only:
        try:
            records = run_grid(out, chosen, args.jobs, args.threads or None, grid.options["keep-checkpoints"],
                               args.cell_timeout, args.retries)
        except GridError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    rows = build_table(out, grid, cells)
    wall = time.perf_counter() - t0
    failed = [r for r in records if r["status"] == "failed"]
    summary = {
        "grid": str(grid.path), "out": str(out), "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.compare",
                                                                      *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": wall, "cells_total": len(cells), "cells_selected": len(chosen),
        "cells_run": sum(r["status"] == "completed" for r in records),
        "cells_skipped": sum(r["status"] == "skipped" for r in records),
        "cells_failed": [r["cell"] for r in failed], "runs": records, "rows": rows,
        "base": grid.base, "axes": grid.axes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print((out / "table.md").read_text())
    print(f"wall time {wall:.1f}s: {summary['cells_run']} cells run, {summary['cells_skipped']} skipped, "
          f"{len(failed)} failed; table in {out / 'table.md'}")
    for r in failed:
        print(f"FAILED {r['cell']}: see {r['log']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
