"""Server-overhead benchmark: a tiny run writes a complete, consistent JSON file (no speed assertions)."""

import json
import math

import pytest

from benchmarks.server_overhead import (
    TARGETS,
    BenchmarkConfigError,
    Cell,
    check_targets,
    main,
    parse_args,
    plan,
    run_cell,
    synthetic_server_dataset,
    table,
)

TINY = ["--ks", "3", "--models", "cnn", "--clean-per-class", "1", "--variants", "1", "--client-images", "16",
        "--client-batch", "8", "--repeats", "1", "--threads", "1", "--device", "cpu"]


def test_synthetic_server_dataset_layout():
    sd = synthetic_server_dataset(clean_per_class=2, variants=3, seed=0)
    assert len(sd) == 10 * 2 * 4
    assert (sd.variants == 0).sum() == 20
    # every augmented row points at a clean row of the same label
    assert (sd.variants[sd.source_index] == 0).all()
    assert (sd.labels == sd.labels[sd.source_index]).all()


def test_plan_sizes_and_errors():
    args = parse_args(["--ks", "10,50,100", "--models", "cnn,resnet18", "--resnet-ks", "10",
                       "--resnet-clean-per-class", "5", "--clean-per-class", "100"])
    cells = plan(args)
    assert [(c.model, c.kind, c.k, c.rows) for c in cells if c.kind == "round"] == [
        ("cnn", "round", 10, 4000), ("cnn", "round", 50, 4000), ("cnn", "round", 100, 4000),
        ("resnet18", "round", 10, 200)]
    epochs = {c.model: c.epoch_images for c in cells if c.kind == "epoch"}
    assert epochs == {"cnn": 5000, "resnet18": 256}
    assert [c.loop for c in cells if c.kind == "round"] == [True, True, False, True]  # --loop-max-k 50
    assert cells[-1].note and not cells[1].note
    full = plan(parse_args(["--full"]))
    assert {(c.model, c.k) for c in full if c.kind == "round"} == {(m, k) for m in ("cnn", "resnet18")
                                                                    for k in (10, 50, 100)}
    assert all(c.rows == 4000 and c.loop for c in full if c.kind == "round")
    assert all(c.epoch_images == 5000 for c in full if c.kind == "epoch")
    with pytest.raises(BenchmarkConfigError, match="--models"):
        plan(parse_args(["--models", "vgg"]))
    with pytest.raises(BenchmarkConfigError, match="--ks"):
        plan(parse_args(["--ks", "10,x"]))
    with pytest.raises(BenchmarkConfigError, match="exclude"):
        parse_args(["--quick", "--full"])
    with pytest.raises(BenchmarkConfigError, match="--variants"):
        parse_args(["--variants", "0"])
    with pytest.raises(BenchmarkConfigError, match="kind"):
        run_cell(Cell(model="cnn", kind="bogus"))


def _check_round(r, k, rows=20):
    assert "error" not in r, r.get("error")
    assert r["cell"]["k"] == k and r["rows"] == rows
    s = r["seconds"]
    for name in ("round", "round_validate", "round_screen", "round_aggregate", "round_distill", "fedavg",
                 "screen_batched", "screen_looped", "screen_vmap", "floor", "floor_cl"):
        assert s[name] > 0 and math.isfinite(s[name]), name
    # the round's phases are parts of the round's wall time
    phases = s["round_validate"] + s["round_screen"] + s["round_aggregate"] + s["round_distill"]
    assert phases <= s["round"] * 1.001
    assert len(r["samples"]["floor"]) == r["cell"]["repeats"]
    q = r["ratios"]
    assert math.isclose(q["round_over_fedavg"], s["round"] / s["fedavg"])
    assert math.isclose(q["batched_over_looped"], s["screen_batched"] / s["screen_looped"])
    assert math.isclose(q["vmap_over_looped"], s["screen_vmap"] / s["screen_looped"])
    assert math.isclose(q["screen_over_floor"], s["round_screen"] / s["floor"])
    assert math.isclose(q["screen_over_floor_cl"], s["round_screen"] / s["floor_cl"])
    assert r["peak_mib"]["round"]["peak"] > 0
    best = r["ratios_best"]
    assert math.isclose(best["screen_over_floor"], min(r["samples"]["round_screen"]) / min(r["samples"]["floor"]))
    assert r["screen_method"] == "sequential"  # what eval_method="auto" picks on CPU
    assert r["round_accepted"] == k  # every synthetic reply passed validation and screening


def test_run_cell_in_process():
    r = run_cell(Cell(model="cnn", k=2, clean_per_class=1, variants=1, repeats=2, device="cpu", threads=1,
                      chunk_size=1))
    _check_round(r, 2)
    assert len(r["samples"]["round"]) == 2 and len(r["samples"]["screen_looped"]) == 2
    e = run_cell(Cell(model="cnn", kind="epoch", client_images=40, epoch_images=20, client_batch=8, repeats=1,
                      device="cpu", threads=1))
    assert e["extrapolated"]
    assert math.isclose(e["seconds"]["client_epoch"], 2 * e["seconds"]["client_epoch_measured"])


def test_round_cell_with_batchnorm_model():
    # num_batches_tracked is a 0-d int64 buffer: the synthetic replies must keep it 0-d
    r = run_cell(Cell(model="resnet8", k=3, clean_per_class=1, variants=1, repeats=1, device="cpu", threads=1,
                      loop=False, vmap=False))
    assert "error" not in r and r["round_accepted"] == 3
    assert r["seconds"]["round_screen"] > 0 and r["seconds"]["round_distill"] > 0
    assert r["ratios"]["batched_over_looped"] is None and "screen_looped" not in r["seconds"]


def test_cli_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "so.json"
    assert main(TINY + ["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["results"]) == 1 and set(data["epochs"]) == {"cnn"}
    r = data["results"][0]
    _check_round(r, 3)
    epoch = data["epochs"]["cnn"]["seconds"]["client_epoch"]
    assert math.isclose(r["ratios"]["round_over_epoch"], r["seconds"]["round"] / epoch)
    assert r["break_even_rows"] >= 0
    assert data["targets_cpu_cnn_k50"] == {}  # no K=50 cell in this run
    printed = capsys.readouterr().out
    assert "| cnn | 3 | 20 |" in printed and str(out) in printed


def test_targets_read_from_the_cnn_k50_cpu_cell():
    fake = {"cell": {"model": "cnn", "k": 50, "kind": "round"}, "device": "cpu", "rows": 400,
            "ratios": {"screen_over_floor": 1.1, "batched_over_looped": 1.3, "round_over_epoch": None}}
    t = check_targets([fake])
    assert set(t) == set(TARGETS)
    assert t["screen_over_floor"]["met"] is True
    assert t["batched_over_looped"]["met"] is False
    assert t["round_over_epoch"]["met"] is None
    assert check_targets([{**fake, "device": "cuda:0"}]) == {}
    assert "error" in table([{"cell": {"model": "cnn", "k": 5}, "error": "exit 1: boom"}])
