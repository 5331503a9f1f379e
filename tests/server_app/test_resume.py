"""Server-side reliability of the real ServerApp (issue 7), run in-process with ``run_inprocess``.

* Kill-and-resume: a run killed in round 3 (a reply hook raises, as a crash would) and resumed with
  ``resume=true`` ends with the same metrics.json rounds as an uninterrupted run with the same seed,
  for FedAvg, FoolsGold (strategy state: per-client histories) and CLIP-Fed (projection head).
* A round whose replies are all rejected keeps the previous global model and the run completes.
* The checkpoint format itself: shapes, dtypes, RNG states and the projection head survive.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from sklearn.datasets import load_digits

from server_app.inprocess import run_inprocess
from server_app.loop import CHECKPOINT, load_checkpoint, load_strategy_state, run_rounds, save_checkpoint

ROUNDS = 4
NUM_CLIENTS = 4
SMALL = {"num-clients": NUM_CLIENTS, "num-server-rounds": ROUNDS, "local-epochs": 1, "max-train-per-client": 120,
         "malicious-ids": "0", "fraction-evaluate": 0.0, "seed": 7}
# CLIP-Fed made cheap: a server set built here (no synthesis), a 1-epoch stand-in teacher, 3 distillation
# steps with a prototype loss strong enough that a lost projection head would change the numbers;
# on CPU, where the comparison can be bit-exact (CUDA kernels need not be deterministic)
CLIPFED = {"defense": "clipfed", "standin-epochs": 1, "distill-steps": 3, "distill-batch": 64,
           "distill-lambda-pcl": 0.5, "device": "cpu"}


class Killed(RuntimeError):
    """Stands in for the process dying."""


class KillAfter:
    """A reply hook that lets ``n`` replies through and then kills the run; counts replies."""

    def __init__(self, n: int | None = None) -> None:
        self.n, self.seen = n, 0

    def __call__(self, partition: int, reply):
        self.seen += 1
        if self.n is not None and self.seen > self.n:
            raise Killed(f"killed while round {(self.seen - 1) // NUM_CLIENTS + 1} was in flight")
        return reply


# LocalGrid sets Flower's process-global task identity: put it back after every test
pytestmark = pytest.mark.usefixtures("restore_task_identity")


@pytest.fixture(scope="module")
def clipfed_setup(tmp_path_factory) -> dict:
    """A server dataset of 100 digits + their hf-patch variants (clean labels), and a shared cache
    directory so the stand-in teacher is trained once for the whole module."""
    from clipfed_strategy.freq_augment import augment_dataset
    from clipfed_strategy.server_dataset import ServerDataset

    root = tmp_path_factory.mktemp("clipfed")
    d = load_digits()
    images = np.round(d.images[-100:] / 16.0 * 255).astype(np.uint8)[..., None]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    sds = ServerDataset(images, d.target[-100:], np.zeros(100), np.arange(100), names)
    augment_dataset(sds, "hf-patch", seed=0).save(root / "sds")
    return {**CLIPFED, "sds-path": str(root / "sds"), "cache-dir": str(root / "cache")}


def comparable(rounds: list[dict]) -> list[dict]:
    """The rounds without wall-clock timings."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(rounds)


def load(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def checkpoint_arrays(out: Path) -> dict[str, np.ndarray]:
    return torch.load(out / CHECKPOINT, weights_only=False)["arrays"]


@pytest.mark.parametrize("defense", ["fedavg", "foolsgold", "clipfed"])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(results_dir, clipfed_setup, defense):
    extra = clipfed_setup if defense == "clipfed" else {"defense": defense}
    base = {**SMALL, **extra, "results-dir": str(results_dir)}
    reference = run_inprocess({**base, "run-name": "uninterrupted"})

    hook = KillAfter(2 * NUM_CLIENTS)  # dies on the first reply of round 3
    with pytest.raises(Killed, match="round 3"):
        run_inprocess({**base, "run-name": "killed"}, reply_hook=hook)
    out = results_dir / "killed"
    partial = load(out)
    assert partial["status"] == "failed" and partial["error"].startswith("Killed")
    assert [r["round"] for r in partial["rounds"]] == [0, 1, 2]
    assert torch.load(out / CHECKPOINT, weights_only=False)["round"] == 2

    hook = KillAfter()
    resumed = run_inprocess({**base, "run-name": "killed", "resume": True}, reply_hook=hook)
    assert resumed == out
    assert hook.seen == (ROUNDS - 2) * NUM_CLIENTS  # rounds 1 and 2 were not re-run
    doc, ref = load(resumed), load(reference)
    assert doc["status"] == "completed" and "error" not in doc
    assert [r["round"] for r in doc["rounds"]] == list(range(ROUNDS + 1))
    assert comparable(doc["rounds"]) == comparable(ref["rounds"])
    # the comparison has teeth: the metrics move from round to round, and decisions are recorded
    assert len({r["ma"] for r in ref["rounds"]}) > 2
    if defense != "fedavg":
        assert all("decisions" in r for r in ref["rounds"][1:])
    final, final_ref = checkpoint_arrays(resumed), checkpoint_arrays(reference)
    assert all(np.array_equal(final[k], final_ref[k]) for k in final_ref)


def test_resume_refuses_a_checkpoint_of_another_configuration(results_dir):
    base = {**SMALL, "num-server-rounds": 2, "results-dir": str(results_dir), "run-name": "r"}
    with pytest.raises(Killed):
        run_inprocess(base, reply_hook=KillAfter(NUM_CLIENTS))
    with pytest.raises(ValueError, match="written by a run with another configuration"):
        run_inprocess({**base, "lr": 0.01, "resume": True})


def test_no_checkpoint_when_disabled(results_dir):
    out = run_inprocess({**SMALL, "num-server-rounds": 1, "checkpoint": False, "results-dir": str(results_dir)})
    assert load(out)["status"] == "completed" and not (out / CHECKPOINT).exists()


# --------------------------------------------------------------------------- all replies rejected


def nan_every_reply(partition: int, reply):
    """A hostile federation: every model that comes back is full of NaN."""
    if reply.has_error():
        return reply
    arrays = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord({
        k: Array(np.full(a.shape, np.nan, a.dtype) if a.dtype.startswith("float") else a.numpy())
        for k, a in arrays.items()
    })
    return reply


def test_clipfed_keeps_the_model_when_every_reply_is_rejected(results_dir, clipfed_setup):
    out = run_inprocess({**SMALL, **clipfed_setup, "num-server-rounds": 2, "results-dir": str(results_dir)},
                        reply_hook=nan_every_reply, fail_nodes=[1003])
    doc = load(out)
    assert doc["status"] == "completed"
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert {(r["ma"], r["asr"]) for r in rounds} == {(rounds[0]["ma"], rounds[0]["asr"])}  # model unchanged
    for r in rounds[1:]:
        assert r["num_rejected"] == NUM_CLIENTS - 1  # the failed node sent an error, not a model
        assert all(d["rejected"] and "contains NaN or Inf" in d["reason"] for d in r["decisions"].values())
        assert r["defense"]["kept_previous_model"] is True
    init = torch.load(out / CHECKPOINT, weights_only=False)["arrays"]
    assert all(np.all(np.isfinite(v)) for v in init.values() if v.dtype.kind == "f")


def test_fedavg_keeps_the_model_when_every_node_fails(results_dir):
    out = run_inprocess({**SMALL, "num-server-rounds": 2, "results-dir": str(results_dir)},
                        fail_nodes=[1000 + i for i in range(NUM_CLIENTS)])
    doc = load(out)
    assert doc["status"] == "completed"
    assert len({(r["ma"], r["asr"]) for r in doc["rounds"]}) == 1
    assert all(r["train_loss"] is None for r in doc["rounds"][1:])


# --------------------------------------------------------------------------- the checkpoint itself


class _Strategy:
    """Just enough of a strategy for the checkpoint: a defence with a state, and a history."""

    def __init__(self, defense=None) -> None:
        self.defense = defense
        self.history: dict[int, np.ndarray] = {}


def test_resume_restores_arrays_with_their_shapes_dtypes_and_rng(tmp_path):
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                          "bn.num_batches_tracked": Array(np.array(12, np.int64))})
    strategy = _Strategy()
    strategy.history[5] = np.ones(3)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / CHECKPOINT, 2, arrays, strategy, [{"round": 0}, {"round": 1}, {"round": 2}], "key")
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)

    fresh, restored, evaluated = _Strategy(), [], []
    out = run_rounds(fresh, None, ArrayRecord(), 2, lambda r, a: evaluated.append(r), timeout=None,
                     checkpoint_path=tmp_path / CHECKPOINT, resume=True, config_key="key",
                     rounds_so_far=lambda: [], restore_rounds=restored.append)
    assert {k: (tuple(a.shape), a.dtype) for k, a in out.items()} == {"w": ((2, 3), "float32"),
                                                                     "bn.num_batches_tracked": ((), "int64")}
    assert np.array_equal(out["w"].numpy(), arrays["w"].numpy()) and int(out["bn.num_batches_tracked"].numpy()) == 12
    assert restored == [[{"round": 0}, {"round": 1}, {"round": 2}]] and evaluated == []  # no round re-run
    assert list(fresh.history) == [5] and np.array_equal(fresh.history[5], np.ones(3))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    with pytest.raises(ValueError, match="another configuration"):
        load_checkpoint(tmp_path / CHECKPOINT, "other-key")
    assert load_checkpoint(tmp_path / "missing.pt", "key") is None


def test_clipfed_projection_head_survives_a_checkpoint(tmp_path):
    """CLIPFedDefense.state_dict/load_state_dict through save_checkpoint/load_checkpoint."""
    from clipfed_strategy.config import CLIPFedConfig
    from clipfed_strategy.core import CLIPFedDefense
    from clipfed_strategy.distillation import DistillConfig
    from clipfed_strategy.freq_augment import augment_dataset
    from clipfed_strategy.server_dataset import ServerDataset

    d = load_digits()
    images = np.round(d.images[:60] / 16.0 * 255).astype(np.uint8)[..., None]
    sds = augment_dataset(ServerDataset(images, d.target[:60], np.zeros(60), np.arange(60),
                                        [str(c) for c in range(10)]), "hf-patch", seed=0)
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=1).numpy()
    logits = 5.0 * np.eye(10, dtype=np.float32)[sds.labels]
    emb = protos[sds.labels]

    def net():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.ReLU(), torch.nn.Linear(12, 10))

    def defense():
        cfg = CLIPFedConfig(device="cpu", distill=DistillConfig(steps=2, batch_size=16, lambda_pcl=0.5))
        return CLIPFedDefense(net(), sds, logits, emb, protos, {"identity": "test"}, cfg)

    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = defense()
    first.distill(1, state)
    save_checkpoint(tmp_path / CHECKPOINT, 1, ArrayRecord(state), _Strategy(first), [], "k")
    second = defense()
    ckpt = load_checkpoint(tmp_path / CHECKPOINT, "k")
    assert set(ckpt["strategy"]["defense"]["head"]) == {"0.weight", "0.bias"}
    load_strategy_state(_Strategy(second), ckpt["strategy"])
    a, _ = first.distill(2, state)
    b, _ = second.distill(2, state)
    c, _ = defense().distill(2, state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
