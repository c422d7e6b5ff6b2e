"""Capture plans: a save of an unchanged structure reuses the last one's names; any change that
shapes the snapshot takes the full capture, and the snapshot is the state at the call either way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moai_ckpt
from moai_ckpt.capture import Captured, capture
from moai_ckpt.plan import PlanCache
from moai_ckpt.rng import GlobalRNG
from tests.helpers import assert_bitwise_equal


class Scheduler:
    """A stateful object with scalars and a nested JSON part (a learning-rate schedule)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"last_epoch": 0, "lrs": [0.1, 0.2], "extra": {"warmup": True}}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def build(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt)
    extra = {"tokens": 10, "t": torch.arange(4.0), "a": torch.zeros(3), "b": torch.ones(3)}
    return {"model": model, "optim": opt, "sched": Scheduler(), "extra": extra}


def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 6)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def same_capture(a: Captured, b: Captured) -> None:
    """Equal trees and the same tensors (the same bytes, not copies) under the same names."""
    assert {k: (r.kind, r.type, r.tree) for k, r in a.objects.items()} == {
        k: (r.kind, r.type, r.tree) for k, r in b.objects.items()
    }
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.shape, t.stride(), t.dtype) == (u.shape, u.stride(), u.dtype), name
        if name.startswith("_rng/"):  # read into a new tensor by each capture
            assert torch.equal(t, u), name
        else:
            assert t.data_ptr() == u.data_ptr(), name
    assert a.devices == b.devices


def planned(plans: PlanCache, state: dict[str, Any]) -> Captured:
    captured, plan = plans.capture(state, rng=GlobalRNG(), rng_key="_rng")
    assert plan is not None
    return captured


def test_an_unchanged_structure_reuses_the_plan_and_reads_every_value_anew() -> None:
    state = build()
    plans = PlanCache()
    same_capture(planned(plans, state), capture(state, rng=GlobalRNG()))
    train(state["model"], state["optim"])
    state["optim"].param_groups[0]["lr"] = 0.5
    state["sched"].state["last_epoch"] = 7
    state["sched"].state["lrs"].append(0.3)  # JSON parts may change shape without a new plan
    state["extra"]["tokens"] = 11
    torch.rand(3)  # the RNG state moves on
    same_capture(planned(plans, state), capture(state, rng=GlobalRNG()))
    assert (plans.hits, plans.misses) == (1, 1)


def _add_param_group(state: dict[str, Any]) -> None:
    extra = nn.Parameter(torch.ones(4))
    state["optim"].add_param_group({"params": [extra], "lr": 0.3})
    extra.grad = torch.ones(4)
    state["optim"].step()


def _reshape_parameter(state: dict[str, Any]) -> None:
    state["model"][2] = nn.Linear(5, 4)  # same names, new shapes


def _new_buffer(state: dict[str, Any]) -> None:
    state["model"][0].register_buffer("mask", torch.ones(6))


def _tie_weights(state: dict[str, Any]) -> None:
    state["extra"]["t2"] = state["extra"]["t"]  # a second name for the same bytes


def _untie_by_new_storage(state: dict[str, Any]) -> None:
    state["extra"]["t"] = state["extra"]["t"].clone()
    state["extra"]["u"] = state["extra"]["t"][:2]


def _rename_entry(state: dict[str, Any]) -> None:
    state["extra"]["s"] = state["extra"].pop("t")


def _new_dtype(state: dict[str, Any]) -> None:
    state["extra"]["t"] = state["extra"]["t"].double()


def _entries_reordered(state: dict[str, Any]) -> None:
    items = list(state.items())
    state.clear()
    state.update(reversed(items))


def _same_shape_tensors_swapped(state: dict[str, Any]) -> None:
    state["extra"]["a"], state["extra"]["b"] = state["extra"].pop("b"), state["extra"].pop("a")


def _scheduler_gains_a_tensor(state: dict[str, Any]) -> None:
    state["sched"].state["extra"]["base"] = torch.full((2,), 0.25)


CHANGES: dict[str, tuple[Callable[[dict[str, Any]], None], bool]] = {
    # name: (change, whether the plan must be taken again from a full capture)
    "param group added": (_add_param_group, True),
    "parameter reshaped": (_reshape_parameter, True),
    "buffer added": (_new_buffer, True),
    "tensor renamed": (_rename_entry, True),
    "dtype changed": (_new_dtype, True),
    "scheduler gains a tensor": (_scheduler_gains_a_tensor, True),
    "entries reordered": (_entries_reordered, True),
    "two tensors of one shape swap keys": (_same_shape_tensors_swapped, False),  # same structure
    "two names for one tensor": (_tie_weights, True),
    "storage replaced, a view added": (_untie_by_new_storage, True),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_that_shapes_the_snapshot_takes_the_full_capture(change: str) -> None:
    state = build()
    plans = PlanCache()
    planned(plans, state)
    apply, must_miss = CHANGES[change]
    apply(state)
    same_capture(planned(plans, state), capture(state, rng=GlobalRNG()))
    assert plans.misses == (2 if must_miss else 1)
    same_capture(planned(plans, state), capture(state, rng=GlobalRNG()))  # the new plan is reused
    assert plans.misses == (2 if must_miss else 1) and plans.hits == (1 if must_miss else 2)


def test_two_names_coming_to_share_their_bytes_take_the_full_capture() -> None:
    state = build()
    state["extra"]["t2"] = state["extra"]["t"].clone()
    plans = PlanCache()
    planned(plans, state)
    state["extra"]["t2"] = state["extra"]["t"]
    captured = planned(plans, state)
    same_capture(captured, capture(state, rng=GlobalRNG()))
    assert plans.misses == 2 and "extra/t2" not in captured.tensors


def test_a_parameter_given_new_storage_of_the_same_shape_is_read_from_the_new_storage() -> None:
    state = build()
    plans = PlanCache()
    planned(plans, state)
    weight = state["model"][0].weight
    weight.data = torch.full_like(weight, 3.0)
    captured = planned(plans, state)
    same_capture(captured, capture(state, rng=GlobalRNG()))
    assert captured.tensors["model/0.weight"].data_ptr() == weight.data_ptr()


def test_an_error_after_a_plan_is_raised_as_by_a_full_capture() -> None:
    state = build()
    plans = PlanCache()
    planned(plans, state)
    state["extra"]["bad"] = object()
    with pytest.raises(moai_ckpt.UnserializableStateError, match=r"extra\.bad"):
        plans.capture(state, rng=None, rng_key="_rng")
    state["extra"]["bad"] = torch.zeros(2, device="meta")
    with pytest.raises(moai_ckpt.UnserializableStateError, match="meta"):
        plans.capture(state, rng=None, rng_key="_rng")


def snapshot(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` as a snapshot restores it (cloned now)."""
    out = {f"model.{k}": v.clone() for k, v in state["model"].state_dict().items()}
    for pid, per in state["optim"].state_dict()["state"].items():
        out |= {f"optim.{pid}.{k}": v.clone() for k, v in per.items() if isinstance(v, torch.Tensor)}
    return out | {f"extra.{k}": v.clone() for k, v in state["extra"].items() if isinstance(v, torch.Tensor)}


def test_save_async_through_structure_changes_restores_the_state_at_each_call(run_dir: str) -> None:
    state = build()
    ckpt = moai_ckpt.Checkpointer(run_dir, fsync=False)
    expected: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    changes = [lambda s: None, _new_buffer, lambda s: None, _add_param_group, _reshape_parameter, lambda s: None]
    for step, change in enumerate(changes, start=1):
        change(state)
        train(state["model"], state["optim"])
        state["extra"]["tokens"] = step
        expected[step] = (snapshot(state), dict(state["sched"].state))
        handle = ckpt.save_async(step, state)
        assert handle is not None
        with torch.no_grad():  # changes after the call never reach the snapshot
            for p in state["model"].parameters():
                p.add_(1.0)
        handle.result(timeout=60)
        state["sched"].state["last_epoch"] = step
    assert ckpt._pool.plans.hits >= 2
    for step in [2, 3, 5, 6]:  # the structures after the buffer was added, and the reshape
        target = build(seed=1)
        _new_buffer(target)
        if step >= 5:
            _add_param_group(target)
            _reshape_parameter(target)
        target["extra"] = {}
        ckpt.restore(target, step)
        tensors, sched = expected[step]
        assert_bitwise_equal(snapshot(target), tensors)
        assert target["extra"]["tokens"] == step and target["sched"].state == sched
    ckpt.close()


def test_entries_of_one_structure_reordered_keep_their_names() -> None:
    """Two entries whose tensors have the same shapes, in the other order: every tensor keeps the
    name of its own path (the plan would otherwise hand each the other's)."""
    first, second = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    plans = PlanCache()
    planned(plans, {"a": first, "b": second})
    captured = planned(plans, {"b": second, "a": first})
    same_capture(captured, capture({"b": second, "a": first}, rng=GlobalRNG()))
    assert torch.equal(captured.tensors["a/w"], first["w"]) and plans.misses == 2
