"""A real torch state_dict (with BatchNorm buffers) goes through every defence and loads back."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from defense_testkit import train_reply
from server_app.defenses import FLTrust, Flame, FoolsGold, RobustLR
from server_app.defenses import update_math as um


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )


def local_state(net: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Perturb the weights and run BN in train mode once, as local training would."""
    local = tiny_net()
    local.load_state_dict(net.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in local.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen) + 0.02)
        local.train()(torch.randn(4, 1, 4, 4, generator=gen))
    return {k: v.numpy() for k, v in local.state_dict().items()}


@pytest.mark.parametrize(
    "strategy",
    [Flame(), FLTrust(server_update_fn=lambda s, r: {k: np.full_like(v, 0.02) for k, v in s.items()}), FoolsGold(), RobustLR()],
    ids=["flame", "fltrust", "foolsgold", "rlr"],
)
def test_torch_state_dict_round_trip(strategy):
    torch.set_num_threads(1)
    net = tiny_net()
    globals_ = {k: v.numpy() for k, v in net.state_dict().items()}
    assert um.select_trainable_keys(globals_) == [n for n, _ in net.named_parameters()]
    strategy.current_arrays = ArrayRecord(net.state_dict())
    replies = [train_reply(local_state(net, s), node_id=s + 1) for s in range(5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    net.load_state_dict(new, strict=True)  # shapes and dtypes survive, incl. 0-d num_batches_tracked
    assert new["1.num_batches_tracked"].dtype == torch.int64 and new["1.num_batches_tracked"].shape == ()
    assert int(new["1.num_batches_tracked"]) == 1
    accepted = strategy.last_round_report["accepted"]
    assert accepted
    mean_rm = np.mean([r.content["arrays"]["1.running_mean"].numpy() for r in replies if r.metadata.src_node_id in accepted], axis=0)
    if isinstance(strategy, (Flame, RobustLR)):  # plain mean over accepted (equal num-examples)
        np.testing.assert_allclose(new["1.running_mean"].numpy(), mean_rm, atol=1e-6)


class WithNormBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((1,), 0.5))
        self.fc = torch.nn.Linear(4, 2)


def test_trainable_keys_of_keeps_other_buffers_out_of_flame_noise():
    torch.manual_seed(0)
    net = WithNormBuffer()
    keys = um.trainable_keys_of(net)
    assert keys == ["fc.weight", "fc.bias"]
    base = {k: v.numpy() for k, v in net.state_dict().items()}
    replies = [
        train_reply({k: v + (0.1 * (i + 1) if k != "mean" else 0) for k, v in base.items()}, node_id=i + 1)
        for i in range(3)
    ]
    for trainable_keys, buffer_untouched in ((keys, True), (None, False)):
        strategy = Flame(noise_lambda=0.1, trainable_keys=trainable_keys)
        strategy.current_arrays = ArrayRecord(net.state_dict())
        arrays, _ = strategy.aggregate_train(1, replies)
        assert (arrays["mean"].numpy() == 0.5).all() == buffer_untouched
