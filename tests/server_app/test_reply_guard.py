"""Every non-CLIP-Fed strategy sits behind ReplyGuard: hostile replies are dropped with a reason."""

import json

import numpy as np
import pytest
from flwr.app import Array

from server_app.inprocess import run_inprocess


def _hostile(i, reply):
    if reply.has_error():
        return reply
    if i == 1:  # an extra metric: Flower's strategies would raise InconsistentMessageReplies
        reply.content["metrics"]["extra"] = 1.0
    if i == 2:  # a NaN in the model
        arrays = reply.content["arrays"]
        key = list(arrays.keys())[1]
        value = arrays[key].numpy().copy()
        value.flat[0] = np.nan
        arrays[key] = Array(value)
    if i == 3:  # absurd example count
        reply.content["metrics"]["num-examples"] = -5
    return reply


@pytest.mark.parametrize("defense", ["fedavg", "flame"])
def test_hostile_replies_are_rejected_and_the_run_completes(defense, tmp_path):
    out = run_inprocess(
        {"num-clients": 4, "num-server-rounds": 2, "results-dir": str(tmp_path), "defense": defense,
         "malicious-ids": "0"},
        reply_hook=_hostile,
    )
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["status"] == "completed"
    last = doc["rounds"][-1]
    reasons = list(last["invalid_replies"].values())
    assert len(reasons) == 2
    assert any("NaN or Inf" in r for r in reasons)
    assert any("num-examples must be a positive integer" in r for r in reasons)
    assert np.isfinite(last["ma"]) and last["ma"] > doc["rounds"][0]["ma"]
