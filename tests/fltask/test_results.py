"""Results files and detection rates."""

import csv
import json

from fltask.results import CSV_FIELDS, RunRecorder, detection_rates


def test_detection_rates_against_ground_truth():
    decisions = {
        "1": {"malicious": True, "rejected": True},
        "2": {"malicious": True, "rejected": False},
        "3": {"malicious": False, "rejected": True},
        "4": {"malicious": False, "rejected": False},
        "5": {"malicious": False, "rejected": False},
        "6": {"malicious": None, "rejected": True},  # unknown role: counts for neither
    }
    tpr, fpr = detection_rates(decisions)
    assert tpr == 0.5 and fpr == 1 / 3
    assert detection_rates({"1": {"malicious": False, "rejected": False}}) == (None, 0.0)
    # screen-purify: a flagged client that was purified and aggregated counts as detected
    purified = {"1": {"malicious": True, "rejected": False, "purified": True},
                "2": {"malicious": False, "rejected": False, "purified": True},
                "3": {"malicious": False, "rejected": False, "purified": False}}
    assert detection_rates(purified) == (1.0, 0.5)


def test_recorder_rewrites_json_and_csv_every_round_and_plots(results_dir):
    rec = RunRecorder(results_dir / "run", {"alpha": 0.5}, {"run_name": "run"})
    rec.add({"round": 0, "ma": 0.1, "asr": 0.05})
    assert json.loads((results_dir / "run" / "metrics.json").read_text())["rounds"][0]["round"] == 0
    rec.add({"round": 1, "ma": 0.5, "asr": 0.9, "train_loss": 1.2, "decisions": {"7": {"rejected": True}}})
    rec.add({"round": 1, "ma": 0.6, "asr": 0.8})  # a repeated round replaces the old entry
    doc = json.loads((results_dir / "run" / "metrics.json").read_text())
    assert doc["config"] == {"alpha": 0.5} and doc["run_name"] == "run"
    assert [(r["round"], r["ma"]) for r in doc["rounds"]] == [(0, 0.1), (1, 0.6)]
    with open(results_dir / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert [(r["round"], r["asr"]) for r in rows] == [("0", "0.05"), ("1", "0.8")]
    png = rec.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
