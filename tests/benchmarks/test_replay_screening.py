"""Replaying recorded screening decisions under other floors / z thresholds."""

import json

from benchmarks.replay_screening import main, replay


def _metrics(tmp_path, name, decisions):
    rounds = [{"round": 0, "decisions": {}}]
    for r, ds in enumerate(decisions, start=1):
        rounds.append({"round": r, "decisions": {
            str(1000 + i): {"malicious": m, "rejected": False, "score": s, "screening": {"collapse": c}}
            for i, (m, s, c) in enumerate(ds)}})
    path = tmp_path / name / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"rounds": rounds}))
    return path


def test_replay_counts_flags_by_floor_and_threshold(tmp_path, capsys):
    # (malicious, combined z, raw collapse): the attacker has a high z but a modest collapse
    path = _metrics(tmp_path, "run", [[(True, 8.0, 0.18), (False, 3.2, 0.16), (False, 0.1, 0.05)],
                                      [(True, 2.0, 0.30), (False, -0.5, 0.02), (False, 4.0, 0.09)]])
    from benchmarks.replay_screening import load_decisions

    rows = load_decisions(path)
    assert len(rows) == 6
    strict = replay(rows, floor=0.2, z_thr=2.5)
    assert (strict["tp"], strict["fp"]) == (0, 0)  # attacker under the floor in round 1, under z in round 2
    loose = replay(rows, floor=0.15, z_thr=3.0)
    assert (loose["tp"], loose["fn"], loose["fp"], loose["tn"]) == (1, 1, 1, 3)
    assert loose["tpr"] == 0.5 and loose["fpr"] == 0.25
    out_json = tmp_path / "replay.json"
    assert main([str(path), "--floors", "0.15,0.2", "--z", "3.0", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "| 0.15 / 3.0 | TPR 0.50, benign rejected 1/4 |" in printed
    assert len(json.loads(out_json.read_text())) == 2


def test_replay_rejects_runs_without_screening_values(tmp_path, capsys):
    path = tmp_path / "fedavg" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"rounds": [{"round": 1, "decisions": {}}]}))
    assert main([str(path)]) == 2
    assert "no screening decisions" in capsys.readouterr().err
