"""The promise itself: a restored run continues bitwise as if nothing had happened."""

from __future__ import annotations

import random

import numpy as np
import torch

import moai_ckpt
from tests.helpers import Trainer, assert_bitwise_equal, full_state_tensors, next_randoms


def _scramble_global_rngs() -> None:
    torch.manual_seed(12345)
    np.random.seed(999)
    random.seed(77)


def test_restored_run_continues_bitwise_identically(run_dir: str) -> None:
    n, m = 5, 4
    original = Trainer.build(seed=0)
    moai_ckpt.register_generator("data", original.data_gen)
    for _ in range(n):
        original.step()
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(n, original.state({"tokens_seen": n * 32, "note": "after warmup"}))
    losses = [original.step() for _ in range(m)]
    expected_tensors = full_state_tensors(original)
    expected_scaler = original.scaler.state_dict()
    expected_sched = original.sched.state_dict()
    expected_randoms = next_randoms(original)

    resumed = Trainer.build(seed=1)  # fresh objects, different initial values
    moai_ckpt.register_generator("data", resumed.data_gen)
    _scramble_global_rngs()
    extra: dict[str, object] = {}
    step = ckpt.restore(resumed.state(extra))
    assert step == n
    assert extra == {"tokens_seen": n * 32, "note": "after warmup"}
    resumed_losses = [resumed.step() for _ in range(m)]

    assert resumed_losses == losses
    assert_bitwise_equal(full_state_tensors(resumed), expected_tensors)
    assert resumed.scaler.state_dict() == expected_scaler
    assert resumed.sched.state_dict() == expected_sched
    assert next_randoms(resumed) == expected_randoms
    moai_ckpt.unregister_generator("data")


def test_optimizer_param_group_hyperparameters_round_trip(run_dir: str) -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(
        [
            {"params": [model.weight], "lr": 0.5, "momentum": 0.9},
            {"params": [model.bias], "lr": 0.01, "nesterov": False},
        ],
        lr=0.1,
    )
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"model": model, "optim": opt})
    model2 = torch.nn.Linear(4, 4)
    opt2 = torch.optim.SGD([{"params": [model2.weight]}, {"params": [model2.bias]}], lr=7.0)
    ckpt.restore({"model": model2, "optim": opt2})
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )


def test_restore_without_rng_leaves_global_generators_alone(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    torch.manual_seed(3)
    ckpt.save(1, {"extra": {"a": 1}})
    torch.manual_seed(4)
    expected = torch.rand(3)
    torch.manual_seed(4)
    ckpt.restore({"extra": {}}, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)


def test_plain_values_and_containers_are_restored_in_place(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    state = {
        "count": 41,
        "name": "run-7",
        "lst": [1, 2.5, None, True],
        "nested": {"t": (1, 2), 3: "int key", "inf": float("inf"), "$odd": "dollar key", "raw": b"\x00\xff"},
    }
    ckpt.save(2, state)
    target: dict[str, object] = {"count": 0, "name": "", "lst": [], "nested": {}}
    lst, nested = target["lst"], target["nested"]
    ckpt.restore(target)
    assert target["count"] == 41 and target["name"] == "run-7"
    assert lst is target["lst"] and lst == [1, 2.5, None, True]
    assert nested is target["nested"] and nested == state["nested"]
