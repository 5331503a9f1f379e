"""The ClientApp called directly with Flower messages, as the simulation engine would call it."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import app as client_app
from fltask.attacks import TriggerSpec
from fltask.config import parse_run_config
from fltask.datasets import load_task_data
from fltask.models import build_model
from fltask.partition import make_split
from fltask.training import attack_success_rate, to_tensor
from server_app.inprocess import default_run_config

NUM_CLIENTS = 4


@pytest.fixture(autouse=True)
def task_identity():
    """Messages created outside a Flower process need the (process-global) task identity; restore it after."""
    from flower_harness import task_identity as identity

    with identity(run_id=7, node_id=0, task_id=1):
        yield


def run_config(**over):
    rc = default_run_config()
    rc.update({"num-clients": NUM_CLIENTS, "local-epochs": 1, "max-train-per-client": 60, "malicious-ids": "0"})
    rc.update(over)
    return rc


def context(pid, rc, num_partitions=NUM_CLIENTS):
    return Context(run_id=7, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": num_partitions},
                   state=RecordDict(), run_config=rc)


def message(kind, state, pid, server_round=1):
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=100 + pid, message_type=kind, group_id=str(server_round))


def initial_state():
    torch.manual_seed(0)
    return build_model("cnn", 1, 10, 8).state_dict()


@pytest.mark.parametrize(("pid", "malicious"), [(0, True), (1, False)])
def test_train_reply_has_arrays_metrics_and_ground_truth(pid, malicious):
    rc = run_config()
    state = initial_state()
    reply = client_app(message("train", state, pid), context(pid, rc))
    assert not reply.has_error()
    content = reply.content
    arrays = content["arrays"].to_torch_state_dict()
    assert set(arrays) == set(state)
    assert any(not torch.equal(arrays[k], state[k]) for k in state)  # it trained
    metrics = content["metrics"]
    cfg = parse_run_config(rc)
    n = len(make_split(cfg, load_task_data(cfg)).partitions[pid])
    assert metrics["num-examples"] == n > 0
    assert metrics["train-loss"] > 0
    truth = content["ground-truth"]
    assert truth["malicious"] is malicious and truth["partition-id"] == pid
    assert set(content.config_records) == {"ground-truth"}  # the role is nowhere else in the reply
    assert reply.metadata.reply_to_message_id is not None


def test_malicious_role_follows_round_and_sampling():
    rc = run_config(**{"malicious-ids": "", "malicious-fraction": 0.5, "attacker-sampling": "fixed",
                       "attack-start-round": 2})
    state = initial_state()
    roles = {pid: client_app(message("train", state, pid, 1), context(pid, rc)).content["ground-truth"]["malicious"]
             for pid in range(NUM_CLIENTS)}
    assert not any(roles.values())  # before attack-start-round nobody attacks
    roles = {pid: client_app(message("train", state, pid, 2), context(pid, rc)).content["ground-truth"]["malicious"]
             for pid in range(NUM_CLIENTS)}
    assert sum(roles.values()) == 2


def test_boosted_attacker_sends_a_scaled_update():
    state = initial_state()
    plain = client_app(message("train", state, 0), context(0, run_config())).content["arrays"].to_torch_state_dict()
    boosted = client_app(message("train", state, 0), context(0, run_config(**{"boost-factor": 4.0})))
    boosted = boosted.content["arrays"].to_torch_state_dict()
    k = "fc.weight"
    torch.testing.assert_close(boosted[k] - state[k], 4.0 * (plain[k] - state[k]))


def test_evaluate_reply_reports_ma_and_asr():
    rc = run_config()
    reply = client_app(message("evaluate", initial_state(), 1), context(1, rc))
    m = reply.content["metrics"]
    assert m["num-examples"] > 0 and 0.0 <= m["ma"] <= 1.0 and 0.0 <= m["asr"] <= 1.0
    # it is the untrained model's local ASR, computed the same way as the central metric
    cfg = parse_run_config(rc)
    data = load_task_data(cfg)
    idx = make_split(cfg, data).partitions[1]
    model = build_model("cnn", 1, 10, 8)
    model.load_state_dict(initial_state())
    want = attack_success_rate(model, to_tensor(data.x_train[idx]), torch.from_numpy(data.y_train[idx]),
                               TriggerSpec.from_config(cfg, 8))
    assert m["asr"] == pytest.approx(want)


def test_supernode_count_mismatch_fails_clearly():
    with pytest.raises(ValueError, match="num-partitions=6.*'num-clients' is 4"):
        client_app(message("train", initial_state(), 0), context(0, run_config(), num_partitions=6))


def test_partition_cache_follows_every_setting_that_changes_the_split():
    """Two runs in one process that differ only in test-size / min-partition-size get their own partitions."""
    state = initial_state()
    for over in ({}, {"test-size": 300}, {"min-partition-size": 0}):
        rc = run_config(**{"max-train-per-client": 0, **over})
        cfg = parse_run_config(rc)
        want = len(make_split(cfg, load_task_data(cfg)).partitions[2])
        reply = client_app(message("train", state, 2), context(2, rc))
        assert reply.content["metrics"]["num-examples"] == want, over
