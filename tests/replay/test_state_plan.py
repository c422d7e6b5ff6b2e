"""The state digest's plan (`replay.stateplan.StateDigests`) gives what a fresh walk gives, and follows changes.

Every step's names and digests are compared with `replay.statedigest.capture_state` (the walk
the plan replaces, computed independently on every call): after training steps (the plan kept),
after each kind of structural change (the plan rebuilt), and with objects it cannot plan. A
one-bit change in any one tensor (parameter, buffer, optimizer state) changes exactly that
entry's digest, and a changed learning rate the optimizer's own entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moai_ckpt
from moai_ckpt.digest import reference_sums
from moai_ckpt.digest_plan import DigestPlan, packed_digest
from replay import statedigest
from replay.statedigest import capture_state
from replay.stateplan import StateDigests
from tests.scenarios.state_scenario import Net, flip_one_bit


class Tied(nn.Module):
    """Tied weights, a buffer, a parameter-less child: the cases the plan's walk must name as the walk does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.net = Net()
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.head(self.emb(idx)).sum(-1, keepdim=True) + self.net(self.emb(idx)).sum(-1, keepdim=True)


def _tracked() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    tracked = {"model": model, "optim": opt, "sched": sched, "_data": moai_ckpt.GlobalSampler(32, 8), "extras": {}}
    _train(tracked)
    return tracked


def _train(tracked: dict[str, Any]) -> None:
    model, opt = tracked["model"], tracked["optim"]
    loss = model(torch.randint(0, 16, (8,))).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracked["sched"].step()
    tracked["_data"].advance(8)


def _both(digests: StateDigests, tracked: dict[str, Any]) -> dict[str, str]:
    """The plan's digests by name, after checking they are the walk's, name for name."""
    walked = capture_state(tracked)
    planned = digests.capture(tracked)
    assert planned.names == walked.names
    values = planned.wait()
    assert values == walked.wait()
    return dict(zip(planned.names, values, strict=True))


def test_the_plan_gives_the_walks_names_and_digests_step_after_step_and_is_built_once() -> None:
    tracked = _tracked()
    digests = StateDigests()
    seen = []
    for _ in range(4):
        seen.append(_both(digests, tracked))
        _train(tracked)
    assert digests.rebuilds == 1
    assert "model/head.weight" not in seen[0] and "model/emb.weight" in seen[0]  # tied: one entry
    assert {"model/count", "optim/state.0.exp_avg", "optim", "sched", "_data"} <= seen[0].keys()
    for name in ("model/count", "model/emb.weight", "optim/state.0.exp_avg", "_data"):
        assert len({s[name] for s in seen}) == 4, name  # the state moved every step, and so did its digest


def _replace_parameter(t: dict[str, Any]) -> None:
    t["model"].net.fc1.weight = nn.Parameter(t["model"].net.fc1.weight.detach().clone() * 2)


def _assign_data(t: dict[str, Any]) -> None:
    t["model"].net.fc2.bias.data = t["model"].net.fc2.bias.detach().clone() + 1


def _add_buffer(t: dict[str, Any]) -> None:
    t["model"].net.register_buffer("extra", torch.ones(3))


def _replace_submodule(t: dict[str, Any]) -> None:
    t["model"].net.fc2 = nn.Linear(16, 4)


def _replace_optimizer_state(t: dict[str, Any]) -> None:
    p = next(iter(t["optim"].state))
    t["optim"].state[p]["exp_avg"] = t["optim"].state[p]["exp_avg"] + 1  # a new tensor, as some optimizers do


def _add_param_group(t: dict[str, Any]) -> None:
    t["optim"].add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.5})


def _shrink_in_place(t: dict[str, Any]) -> None:
    running_var = t["model"].net.b1.running_var  # same address, half the size
    running_var.set_(running_var.untyped_storage(), 0, (running_var.numel() // 2,))


def _track_another_optimizer(t: dict[str, Any]) -> None:
    t["optim"] = torch.optim.SGD(t["model"].parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    "change",
    [
        _replace_parameter,
        _assign_data,
        _add_buffer,
        _replace_submodule,
        _replace_optimizer_state,
        _add_param_group,
        _shrink_in_place,
        _track_another_optimizer,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_change_of_structure_rebuilds_the_plan_and_the_digests_follow(
    change: Callable[[dict[str, Any]], None],
) -> None:
    tracked = _tracked()
    digests = StateDigests()
    before = _both(digests, tracked)
    change(tracked)
    after = _both(digests, tracked)  # compared with a fresh walk inside
    assert digests.rebuilds == 2
    assert after != before
    _both(digests, tracked)
    assert digests.rebuilds == 2  # the new plan holds


def test_a_one_bit_change_in_any_tensor_changes_exactly_its_entry() -> None:
    tracked = _tracked()
    digests = StateDigests()
    before = _both(digests, tracked)
    tensors = {
        "model/count": tracked["model"].count,
        "model/emb.weight": tracked["model"].emb.weight,
        "model/net.b1.running_var": tracked["model"].net.b1.running_var,
    }
    params = [p for g in tracked["optim"].param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for name, value in tracked["optim"].state[p].items():
            tensors[f"optim/state.{i}.{name}"] = value
    assert len(tensors) > 10
    for name, tensor in tensors.items():
        flip_one_bit(tensor)
        after = dict(zip(*_names_and_digests(digests, tracked), strict=True))
        assert {k for k in before if after[k] != before[k]} == {name}
        flip_one_bit(tensor)
    assert digests.rebuilds == 1


def _names_and_digests(digests: StateDigests, tracked: dict[str, Any]) -> tuple[list[str], list[str]]:
    pending = digests.capture(tracked)
    return pending.names, pending.wait()


def test_a_changed_learning_rate_changes_the_optimizers_own_entry_only() -> None:
    tracked = _tracked()
    digests = StateDigests()
    before = _both(digests, tracked)
    tracked["optim"].param_groups[0]["lr"] *= 1.5
    after = _both(digests, tracked)
    assert {k for k in before if after[k] != before[k]} == {"optim"}
    assert digests.rebuilds == 1


class Hooked(nn.Module):
    """State the plan cannot keep: extra state, and a state_dict hook that makes tensors on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0
        self._register_state_dict_hook(Hooked._add_scaled)

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]

    @staticmethod
    def _add_scaled(module: nn.Module, state: dict[str, Any], prefix: str, _: Any) -> None:
        state[prefix + "scaled"] = module.fc.weight.detach() * 2


def test_objects_the_plan_cannot_keep_are_walked_every_step_and_still_followed() -> None:
    tracked = _tracked()
    tracked["hooked"] = hooked = Hooked()
    digests = StateDigests()
    before = _both(digests, tracked)
    hooked.calls += 1
    with torch.no_grad():
        hooked.fc.weight.mul_(1.5)
    after = _both(digests, tracked)
    changed = {k for k in before if after[k] != before[k]}
    assert {"hooked", "hooked/fc.weight", "hooked/scaled"} <= changed
    assert digests.rebuilds == 1


def test_the_packed_digests_are_the_packed_strings_byte_for_byte() -> None:
    tracked = _tracked()
    tracked["meta"] = {"w": torch.empty(3, device="meta"), "t": torch.randn(4, 4).t()}  # no bytes; not contiguous
    digests = StateDigests()
    for _ in range(2):
        pending = digests.capture(tracked)
        assert pending.packed() == statedigest.pack(pending.wait())
        assert statedigest.unpack(pending.packed()) == capture_state(tracked).wait()
        _train(tracked)


def test_device_sums_pack_as_their_strings_negative_ones_too() -> None:
    """The rows a device returns (int64 sums, any sign) packed straight, as `pack` packs their strings."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32) for n in (1, 40, 5000)]
    plan = DigestPlan(tensors)
    pending = plan.start()
    sums = reference_sums(tensors)
    sums[0, 0] = -(2**63)  # both signs and the extremes of int64
    sums[1, 1] = 2**63 - 1
    pending.rows = [([0, 1, 2], sums)]
    plan.heads = [packed_digest(n, 0, 0)[:-16] for n in plan.sizes]  # as a device plan's entries begin
    assert b"".join(pending.packed()) == statedigest.pack(pending.wait())
    assert all(d.startswith("mix64:") for d in pending.wait())
