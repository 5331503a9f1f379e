"""Neurotoxin: the mask, masked local training, the ClientApp path, and that the backdoor still implants."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import PREV_GLOBAL
from client_app.app import app as client_app
from fltask.attacks import TriggerSpec, benign_update_estimate, neurotoxin_mask
from fltask.config import ConfigError, parse_run_config
from fltask.datasets import load_digits
from fltask.models import build_model
from fltask.training import Poisoning, attack_success_rate, main_accuracy, to_tensor, train_local
from server_app.inprocess import default_run_config


def param_keys(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def digits_model(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", 1, 10, 8)


def badnets():
    return TriggerSpec(kind="badnets", target=0, size=2, position="bottom-right", pattern="checkerboard",
                       blend_alpha=0.2, blend_pattern="noise", dba_parts=4, seed=0)


# ---------------------------------------------------------------------------- the mask
def test_mask_freezes_exactly_the_largest_share_globally():
    update = {"a": torch.tensor([[0.1, -5.0], [0.2, 0.3]]), "b": torch.tensor([4.0, -0.05, 3.0, 0.0, 0.01, 0.02])}
    mask = neurotoxin_mask(update, 0.3)  # round(0.3 * 10) = 3 coordinates frozen: |−5|, 4, 3 (across tensors)
    assert torch.equal(mask["a"], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(mask["b"], torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0]))
    assert all(torch.equal(m, torch.ones_like(m)) for m in neurotoxin_mask(update, 0.0).values())


@pytest.mark.parametrize("topk", [-0.1, 1.0])
def test_mask_rejects_shares_outside_0_1(topk):
    with pytest.raises(ValueError, match="neurotoxin-topk"):
        neurotoxin_mask({"a": torch.ones(3)}, topk)
    with pytest.raises(ConfigError, match="'neurotoxin-topk'"):
        parse_run_config({"neurotoxin-topk": topk})


def test_benign_estimate_is_global_difference_or_the_global_itself():
    g = {"w": torch.tensor([1.0, 2.0]), "running_mean": torch.zeros(2)}
    prev = {"w": torch.tensor([0.5, 2.5]), "running_mean": torch.ones(2)}
    assert torch.equal(benign_update_estimate(g, prev, ["w"])["w"], torch.tensor([0.5, -0.5]))
    assert set(benign_update_estimate(g, prev, ["w"])) == {"w"}  # only the given (trainable) keys
    assert torch.equal(benign_update_estimate(g, None, ["w"])["w"], g["w"])
    assert torch.equal(benign_update_estimate(g, {"w": torch.zeros(3)}, ["w"])["w"], g["w"])  # shape mismatch


# ---------------------------------------------------------------------------- masked training
def test_masked_update_is_exactly_zero_outside_the_mask_with_momentum_decay_and_pgd():
    torch.set_num_threads(1)
    data = load_digits()
    x, y = to_tensor(data.x_train[:200]), torch.from_numpy(data.y_train[:200])
    model = digits_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    keys = param_keys(model)
    g = torch.Generator().manual_seed(1)
    fake_benign = {k: torch.randn(start[k].shape, generator=g) for k in keys}
    mask = neurotoxin_mask(fake_benign, 0.5)
    train_local(model, x, y, epochs=2, lr=0.05, batch_size=32, momentum=0.9, weight_decay=5e-3,
                poisoning=Poisoning(badnets(), 0.5, pgd_radius=3.0, grad_mask=mask))
    end = model.state_dict()
    moved_inside = 0
    for k in keys:
        delta = end[k] - start[k]
        assert torch.all(delta[mask[k] == 0] == 0), k
        moved_inside += int((delta[mask[k] == 1] != 0).sum())
    assert moved_inside > 0.5 * sum(int(m.sum()) for m in mask.values())  # the rest did train


def test_backdoor_still_implants_on_digits_under_the_mask():
    torch.set_num_threads(1)
    data = load_digits()
    x, y = to_tensor(data.x_train), torch.from_numpy(data.y_train)
    xt, yt = to_tensor(data.x_test), torch.from_numpy(data.y_test)
    model = digits_model()
    train_local(model, x, y, epochs=2, lr=0.05, batch_size=32, seed=1)  # a benign "previous global"
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, x, y, epochs=1, lr=0.05, batch_size=32, seed=2)  # benign clients move it on
    current = {k: v.clone() for k, v in model.state_dict().items()}
    mask = neurotoxin_mask(benign_update_estimate(current, previous, param_keys(model)), 0.1)
    spec = badnets()
    asr_before = attack_success_rate(model, xt, yt, spec)
    train_local(model, x[:400], y[:400], epochs=3, lr=0.05, batch_size=32, seed=3,
                poisoning=Poisoning(spec, 0.5, grad_mask=mask))
    asr, ma = attack_success_rate(model, xt, yt, spec), main_accuracy(model, xt, yt)
    assert asr_before < 0.3
    assert asr > 0.8, asr
    assert ma > 0.8, ma
    for k in param_keys(model):  # and it never touched the frozen 10%
        assert torch.all((model.state_dict()[k] - current[k])[mask[k] == 0] == 0)


# ---------------------------------------------------------------------------- through the ClientApp
@pytest.fixture
def task_identity():
    from flower_harness import task_identity as identity

    with identity(run_id=7, node_id=0, task_id=1):
        yield


def _train(state, pid, server_round, ctx):
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    msg = Message(content=content, dst_node_id=100 + pid, message_type="train", group_id=str(server_round))
    reply = client_app(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply.content["arrays"].to_torch_state_dict(), reply.content["ground-truth"]["malicious"]


def test_clientapp_masks_with_the_previous_global_kept_in_context_state(task_identity):
    torch.set_num_threads(1)
    rc = default_run_config()
    rc.update({"num-clients": 4, "local-epochs": 1, "max-train-per-client": 60, "malicious-ids": "0",
               "neurotoxin-topk": 0.2})
    ctx = {pid: Context(run_id=7, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": 4},
                        state=RecordDict(), run_config=rc) for pid in (0, 1)}
    first = digits_model(0).state_dict()
    keys = param_keys(digits_model(0))
    out1, mal = _train(first, 0, 1, ctx[0])
    assert mal
    no_prev = neurotoxin_mask(benign_update_estimate(first, None, keys), 0.2)  # round 1: |global| stands in
    assert all(torch.all((out1[k] - first[k])[no_prev[k] == 0] == 0) for k in keys)
    assert torch.equal(ctx[0].state[PREV_GLOBAL].to_torch_state_dict()["fc.weight"], first["fc.weight"])

    second = {k: v + 0.01 * torch.randn_like(v) if k in keys else v.clone() for k, v in first.items()}
    out2, _ = _train(second, 0, 2, ctx[0])
    mask = neurotoxin_mask(benign_update_estimate(second, first, keys), 0.2)
    assert not all(torch.equal(mask[k], no_prev[k]) for k in keys)
    for k in keys:
        delta = out2[k] - second[k]
        assert torch.all(delta[mask[k] == 0] == 0), k
    assert sum(int((out2[k] != second[k]).sum()) for k in keys) > 0

    benign, mal = _train(second, 1, 2, ctx[1])  # a benign client is not restricted and keeps nothing
    assert not mal and PREV_GLOBAL not in ctx[1].state
    frozen = sum(int(((benign[k] - second[k]) != 0)[mask[k] == 0].sum()) for k in keys)
    assert frozen > 0
