"""The comparison runner: grid parsing, table maths on fake metrics files, and a real smoke grid with resume."""

import csv
import json
import math
import tomllib
from pathlib import Path

import pytest

from benchmarks.compare import (
    PROJECT_ROOT,
    Grid,
    GridError,
    cell_status,
    check_cells,
    load_grid,
    main,
    mean_std,
    select,
    summarize_run,
    teacher_builders,
    table_rows,
    write_tables,
)

GRIDS = PROJECT_ROOT / "benchmarks" / "grids"


# ---------------------------------------------------------------------------- fake metrics files
def fake_run(defense, attack, seed, ma, asr, alpha=0.5, status="completed", rounds=None, teacher=None):
    rounds = rounds or [
        {"round": 0, "ma": 0.1, "asr": 0.1},
        {"round": 1, "ma": 0.5, "asr": 0.9, "attackers": [0], "tpr": 1.0, "fpr": 0.0, "seconds_server": 1.0},
        {"round": 2, "ma": ma, "asr": asr, "attackers": [], "tpr": None, "fpr": 0.5, "seconds_server": 3.0},
    ]
    doc = {"status": status, "config": {"defense": defense, "attack": attack, "alpha": alpha, "seed": seed},
           "rounds": rounds, "seconds_total": 10.0}
    if teacher:
        doc["teacher"] = {"label": teacher, "is_standin": True}
    return doc


def test_mean_and_sample_std():
    assert mean_std([0.8, 0.9]) == pytest.approx((0.85, math.sqrt(0.005)))  # ddof = 1
    assert mean_std([0.4, None, float("nan")]) == (0.4, None)  # one value: no std
    assert mean_std([]) == (None, None)


def test_run_summary_uses_final_round_and_rounds_with_attackers():
    s = summarize_run(fake_run("flame", "badnets", 0, ma=0.7, asr=0.2))
    assert s["ma"] == 0.7 and s["asr"] == 0.2 and s["rounds"] == 2
    assert s["tpr"] == 1.0 and s["fpr"] == 0.0  # round 2 had no attackers: not counted
    assert s["server_s"] == 2.0  # rounds 1 and 2, round 0 is the initial evaluation


def test_table_rows_pool_seeds_and_compare_with_clean_fedavg(tmp_path):
    docs = [
        fake_run("fedavg", "none", 0, ma=0.90, asr=0.05), fake_run("fedavg", "none", 1, ma=0.80, asr=0.15),
        fake_run("fedavg", "none", 0, ma=0.50, asr=0.0, alpha=0.1),
        fake_run("clipfed", "badnets", 0, ma=0.80, asr=0.10, teacher="open_clip:standin:/x/standin.pt (stand-in teacher, not CLIP)"),
        fake_run("clipfed", "badnets", 1, ma=0.70, asr=0.30, teacher="open_clip:standin:/x/standin.pt (stand-in teacher, not CLIP)"),
        fake_run("clipfed", "badnets", 2, ma=0.0, asr=1.0, status="running"),  # unfinished: ignored
        fake_run("clipfed", "badnets", 0, ma=0.40, asr=0.50, alpha=0.1),
    ]
    columns = ["defense", "attack", "alpha"]
    rows = {(r["defense"], r["attack"], r["alpha"]): r for r in table_rows(docs, columns)}
    assert len(rows) == 4
    clean = rows[("fedavg", "none", 0.5)]
    assert clean["ma"] == pytest.approx(0.85) and clean["ma_std"] == pytest.approx(math.sqrt(0.005))
    assert clean["delta_ma"] == pytest.approx(0.0)
    cf = rows[("clipfed", "badnets", 0.5)]
    assert cf["n"] == 2 and cf["seeds"] == [0, 1]
    assert cf["ma"] == pytest.approx(0.75) and cf["ma_std"] == pytest.approx(math.sqrt(0.005))
    assert cf["asr"] == pytest.approx(0.20) and cf["asr_std"] == pytest.approx(math.sqrt(0.02))
    assert cf["delta_ma"] == pytest.approx(0.75 - 0.85)
    assert cf["tpr"] == 1.0 and cf["fpr"] == 0.0 and cf["server_s"] == 2.0
    assert cf["note"] == "open_clip:standin:/x/standin.pt (stand-in teacher, not CLIP)"
    low = rows[("clipfed", "badnets", 0.1)]
    assert low["delta_ma"] == pytest.approx(0.40 - 0.50)  # against the clean row of the same alpha
    assert low["ma_std"] is None

    write_tables(tmp_path, list(rows.values()), columns)
    md = (tmp_path / "table.md").read_text()
    assert "| clipfed | badnets | 0.5 | 0,1 | 75.0 ± 7.1 | 20.0 ± 14.1 | -10.0 | 100.0 | 0.0 | 2.00 | STAND-IN teacher (not CLIP) |" in md
    with open(tmp_path / "table.csv") as f:
        table = {(r["defense"], r["attack"], r["alpha"]): r for r in csv.DictReader(f)}
    assert float(table[("clipfed", "badnets", "0.5")]["ma"]) == pytest.approx(0.75)
    assert table[("clipfed", "badnets", "0.5")]["note"].endswith("/x/standin.pt (stand-in teacher, not CLIP)")  # in full


# ---------------------------------------------------------------------------- grid files
def write_grid(tmp_path, text):
    p = tmp_path / "g.toml"
    p.write_text(text)
    return p


def test_grid_cells_add_the_clean_baseline_and_filter(tmp_path):
    g = load_grid(write_grid(tmp_path, '[base]\ndataset = "digits"\n[grid]\ndefense = ["fedavg", "flame"]\n'
                                       'attack = ["badnets", "blend"]\nalpha = [0.5, 0.1]\nseed = [0, 1]\n'))
    names = [c.name for c in g.cells()]
    assert len(names) == 4 + 2 * 2 * 2 * 2 and len(set(names)) == len(names)
    assert names[0] == "fedavg_none_a0.5_s0"
    assert "flame_blend_a0.1_s1" in names
    only = select(g.cells(), ["defense=flame", "alpha=0.1"])
    assert sorted(c.name for c in only) == ["flame_badnets_a0.1_s0", "flame_badnets_a0.1_s1",
                                            "flame_blend_a0.1_s0", "flame_blend_a0.1_s1"]
    assert all(c.overrides["dataset"] == "digits" for c in only)


def test_any_run_config_key_can_be_an_axis(tmp_path):
    g = load_grid(write_grid(tmp_path, '[grid]\ndefense = ["rlr"]\nattack = ["dba"]\n'
                                       'attacker-sampling = ["fixed", "per-round"]\nneurotoxin-topk = [0.0, 0.1]\n'))
    cells = {c.name: c for c in g.cells()}
    cell = cells["rlr_dba_attacker-sampling-per-round_neurotoxin-topk-0.1"]
    assert cell.overrides["attacker-sampling"] == "per-round" and cell.overrides["neurotoxin-topk"] == 0.1
    assert len(cells) == 2 * 2 + 2 * 2  # + the clean cells, one per value of the other axes
    check_cells(cells.values())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[base]\ndataset-path = "no/such/cifar10.npz"\n[grid]\nseed = [0]\n', "dataset-path.*does not exist"),
        ('[base]\nresults-dir = "x"\n[grid]\nseed = [0]\n', "set by the runner"),
        ('[grid]\nseed = 0\n', "non-empty list"),
        ('[base]\n[grid]\n', r"\[grid\] is empty"),
        ('[runner]\nbaseline = "yes"\n[grid]\nseed = [0]\n', "true or false"),
    ],
)
def test_bad_grid_files_fail_clearly(tmp_path, text, match):
    with pytest.raises(GridError, match=match):
        load_grid(write_grid(tmp_path, text))


def test_bad_run_config_values_fail_before_anything_runs(tmp_path):
    g = load_grid(write_grid(tmp_path, '[grid]\ndefense = ["fedavg", "fldetector"]\n'))
    with pytest.raises(GridError, match="fldetector.*allowed values"):
        check_cells(g.cells())


@pytest.mark.parametrize("name", ["cpu", "gpu", "smoke"])
def test_shipped_grids_are_valid_run_configs(tmp_path, name):
    doc = tomllib.loads((GRIDS / f"{name}.toml").read_text())
    base = dict(doc.get("base", {}))
    if "dataset-path" in base:  # CI has no ../shared: point it at a stand-in file
        (tmp_path / "cifar10.npz").write_bytes(b"")
        base["dataset-path"] = str(tmp_path / "cifar10.npz")
    g = Grid(GRIDS / f"{name}.toml", base, doc["grid"])
    cells = g.cells()
    check_cells(cells)
    if name == "cpu":
        assert len(cells) == 11 * 3 * 2 * 2 + 2 * 2
        assert {c.overrides["defense"] for c in cells} == {"fedavg", "krum", "multikrum", "median", "trimmedmean",
                                                         "bulyan", "clipfed", "flame", "fltrust", "foolsgold", "rlr"}
        assert base["num-clients"] == 20 and base["malicious-fraction"] == 0.2


def test_parallel_runs_build_each_cached_teacher_once_first(tmp_path):
    g = load_grid(write_grid(tmp_path, '[grid]\ndefense = ["fedavg", "fltrust", "clipfed"]\nattack = ["badnets"]\n'
                                       'heldout-size = [100, 200]\nseed = [0, 1]\n'))
    assert [c.name for c in teacher_builders(g.cells())] == ["fltrust_badnets_heldout-size-100_s0",
                                                             "fltrust_badnets_heldout-size-200_s0"]
    # on resume, a setting whose teacher a completed cell already built (and cached) runs in parallel
    done = [c for c in g.cells() if c.name == "clipfed_badnets_heldout-size-100_s1"]
    assert [c.name for c in teacher_builders(g.cells(), built=done)] == ["fltrust_badnets_heldout-size-200_s0"]


def test_cell_status_reads_metrics_json(tmp_path):
    g = load_grid(write_grid(tmp_path, '[base]\nnum-clients = 4\n[grid]\ndefense = ["fedavg"]\nattack = ["none"]\n'))
    cell = g.cells()[0]
    d = tmp_path / "cells" / cell.name
    assert cell_status(tmp_path, cell) == "todo"
    d.mkdir(parents=True)
    doc = {"status": "running", "config": {"num-clients": 4, "defense": "fedavg", "attack": "none"}, "rounds": []}
    (d / "metrics.json").write_text(json.dumps(doc))
    assert cell_status(tmp_path, cell) == "partial"
    (d / "metrics.json").write_text(json.dumps({**doc, "status": "completed"}))
    assert cell_status(tmp_path, cell) == "completed"
    (d / "metrics.json").write_text(json.dumps({**doc, "status": "completed", "config": {**doc["config"],
                                                                                          "num-clients": 8}}))
    assert cell_status(tmp_path, cell) == "stale"


# ---------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_smoke_grid_runs_writes_the_table_and_skips_finished_cells(tmp_path):
    out = tmp_path / "out"
    assert main(["--grid", str(GRIDS / "smoke.toml"), "--out", str(out)]) == 0
    cells = ["fedavg_none_a0.5_s0", "fedavg_badnets_a0.5_s0", "flame_badnets_a0.5_s0"]
    for name in cells:
        doc = json.loads((out / "cells" / name / "metrics.json").read_text())
        assert doc["status"] == "completed" and len(doc["rounds"]) == 3  # round 0 + 2 rounds
        assert (out / "cells" / name / "curves.png").is_file()
        assert not (out / "cells" / name / "checkpoint.pt").exists()  # removed once completed
        assert (out / "logs" / f"{name}.log").is_file()
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| defense | attack | alpha | seeds | MA % | ASR % | ΔMA vs clean FedAvg")
    assert [line.split(" | ")[:2] for line in md[2:]] == [["| fedavg", "none"], ["| fedavg", "badnets"],
                                                          ["| flame", "badnets"]]
    assert md[2].split(" | ")[6] == "+0.0"  # the clean row is its own reference
    assert (out / "summary.png").is_file() and (out / "table.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells_run"] == 3 and summary["cells_skipped"] == 0 and summary["wall_seconds"] > 0
    flame = next(r for r in summary["rows"] if r["defense"] == "flame")
    assert flame["tpr"] is not None and flame["fpr"] is not None  # FLAME reports decisions
    assert next(r for r in summary["rows"] if r["attack"] == "badnets" and r["defense"] == "fedavg")["tpr"] is None

    mtimes = {n: (out / "cells" / n / "metrics.json").stat().st_mtime_ns for n in cells}
    assert main(["--grid", str(GRIDS / "smoke.toml"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells_run"] == 0 and summary["cells_skipped"] == 3
    assert summary["wall_seconds"] < 30
    assert {n: (out / "cells" / n / "metrics.json").stat().st_mtime_ns for n in cells} == mtimes
    assert (out / "table.md").read_text().splitlines() == md


def test_a_cell_past_its_timeout_is_dumped_killed_and_resumed_from_its_checkpoint(tmp_path):
    """``--cell-timeout``: the hung (here: merely long) cell's stacks land in its log, it is killed and
    relaunched once (``--retries 1``), the relaunch resumes from the last round checkpoint, and the
    grid reports the cell as failed instead of waiting for ever."""
    grid = write_grid(tmp_path, '[base]\ndataset = "digits"\nmodel = "cnn"\nnum-clients = 3\n'
                                'num-server-rounds = 400\nlocal-epochs = 1\nmax-train-per-client = 40\n'
                                'heldout-size = 100\n[grid]\ndefense = ["fedavg"]\nattack = ["none"]\n')
    out = tmp_path / "out"
    assert main(["--grid", str(grid), "--out", str(out), "--cell-timeout", "15", "--retries", "1"]) == 1
    log_text = (out / "logs" / "fedavg_none.log").read_text()
    assert log_text.count(" cell fedavg_none: {") == 2  # launched, then relaunched
    assert log_text.count("killed after 15s") == 2
    assert "Thread 0x" in log_text or "Current thread" in log_text  # faulthandler's stack dump
    assert "resuming from" in log_text  # the relaunch picked up the checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells_failed"] == ["fedavg_none"]
