"""Canonical names: a snapshot restores into the same model wrapped differently, or not at all.

Wrappers: DDP, ``nn.DataParallel``, ``torch.compile``, activation checkpointing, FSDP2 and their
combinations, around the whole model or a submodule. DDP and FSDP2 run on a real one-rank gloo
group in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import moai_ckpt
from moai_ckpt import capture as capture_module
from moai_ckpt.wrappers import (
    canonical_name,
    canonical_names,
    canonical_state_dict,
    legacy_canonical,
    live_state_dict,
    stored_to_live,
    unwrap,
)
from replay.stepstate import parameters_of


class Net(nn.Module):
    """Linear layers, a BatchNorm (buffers) and a submodule held in an attribute called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.module = nn.Linear(8, 3)  # an ordinary attribute name that DDP also uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.block(self.norm(self.inp(x))))


PLAIN_NAMES = [
    "inp.weight",
    "inp.bias",
    "norm.weight",
    "norm.bias",
    "norm.running_mean",
    "norm.running_var",
    "norm.num_batches_tracked",
    "block.0.weight",
    "block.0.bias",
    "module.weight",
    "module.bias",
]


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    """A one-rank gloo group, so DDP and FSDP2 can wrap models in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp(m: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(m)


def fsdp2(m: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(m.block)
    return fully_shard(m)  # type: ignore[no-any-return]


def checkpointed(m: nn.Module) -> nn.Module:
    m.block = checkpoint_wrapper(m.block)  # type: ignore[assignment]
    return m


def compiled_block(m: nn.Module) -> nn.Module:
    m.block = torch.compile(m.block)  # type: ignore[assignment]
    return m


def data_parallel_inner(m: nn.Module) -> nn.Module:
    m.block = nn.DataParallel(m.block)  # type: ignore[assignment]
    return m


WRAPPINGS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda m: m,
    "ddp": ddp,
    "data_parallel": nn.DataParallel,
    "compile": torch.compile,
    "checkpoint": checkpointed,
    "fsdp2": fsdp2,
    "compiled_submodule": compiled_block,
    "data_parallel_submodule": data_parallel_inner,
    "ddp(compile)": lambda m: ddp(torch.compile(m)),
    "compile(ddp)": lambda m: torch.compile(ddp(m)),
    "ddp(checkpoint)": lambda m: ddp(checkpointed(m)),
    "fsdp2(checkpoint)": lambda m: fsdp2(checkpointed(m)),
    "compile(checkpoint)": lambda m: torch.compile(checkpointed(m)),
    "data_parallel(compile)": lambda m: nn.DataParallel(torch.compile(m)),
    "ddp(compiled_submodule)": lambda m: ddp(compiled_block(m)),
}


def build(seed: int, wrapping: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model under ``wrapping`` whose every parameter, buffer and optimizer slot depends on ``seed``."""
    torch.manual_seed(seed)
    net = Net()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        net.norm(torch.randn(5, 8, generator=gen))  # running statistics move
    model = WRAPPINGS[wrapping](net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return model, opt


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and optimizer tensor, whole and on the CPU, by canonical name."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    out = {f"model.{k}": whole(v) for k, v in canonical_state_dict(model).items()}
    names = list(canonical_names(model, [n for n, _ in model.named_parameters()]).values())
    for name, p in zip(names, model.parameters(), strict=True):
        for slot, value in opt.state[p].items():
            out[f"optim.{name}.{slot}"] = whole(value)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_canonical_names_drop_exactly_the_segments_wrappers_add(group: None) -> None:
    for wrapping in WRAPPINGS:
        model = WRAPPINGS[wrapping](Net())
        assert list(canonical_state_dict(model)) == PLAIN_NAMES, wrapping
        params = [n for n, _ in model.named_parameters()]
        assert list(canonical_names(model, params).values()) == [n for n, _ in Net().named_parameters()], wrapping
        assert isinstance(unwrap(model), Net), wrapping
    wrapped = ddp(torch.compile(Net()))
    assert canonical_name(wrapped, "module._orig_mod.module.weight") == "module.weight"  # the user's `module` stays
    assert type(unwrap(wrapped)) is Net


def test_two_live_names_that_would_become_one_keep_their_live_names() -> None:
    model = nn.Module()
    model.a = nn.DataParallel(nn.Linear(2, 2))  # a.module.weight -> a.weight ...
    model.a.weight = nn.Parameter(torch.zeros(2, 2))  # ... which the wrapper itself also has
    names = canonical_names(model)
    assert all(live == canonical for live, canonical in names.items())


def test_names_an_older_snapshot_stored_with_wrapper_segments_map_onto_the_live_model() -> None:
    known = PLAIN_NAMES
    by_ddp = [f"module.{n}" for n in known]
    assert legacy_canonical(by_ddp, known) == dict(zip(by_ddp, known, strict=True))
    assert legacy_canonical(by_ddp) == dict(zip(by_ddp, known, strict=True))  # no model at hand: a leading module.
    nested = ["module._orig_mod.block.module.0.weight", "module._orig_mod.module.weight", "module.inp.bias"]
    assert legacy_canonical(nested, known) == {
        nested[0]: "block.0.weight",
        nested[1]: "module.weight",  # the user's own `module` attribute is kept
        nested[2]: "inp.bias",
    }
    assert legacy_canonical(["nothing.like.it"], known) == {"nothing.like.it": "nothing.like.it"}
    compiled = torch.compile(Net())  # a DDP model's old snapshot, restored into a compiled model
    assert stored_to_live(compiled, by_ddp) == {s: f"_orig_mod.{n}" for s, n in zip(by_ddp, known, strict=True)}
    assert set(live_state_dict(compiled, {s: torch.zeros(1) for s in by_ddp})) == set(compiled.state_dict())


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_a_snapshot_round_trips_between_a_wrapped_and_the_plain_model(
    group: None, wrapping: str, tmp_path: Path
) -> None:
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"))
    model, opt = build(1, wrapping)
    expected = state_of(model, opt)
    ckpt.save(1, {"model": model, "optim": opt})
    assert "model/inp.weight" in ckpt.manifest(1).arrays  # stored under the plain model's names
    for target in ("plain", wrapping):  # into the plain model, and into the same wrapping
        other, other_opt = build(2, target)
        ckpt.restore({"model": other, "optim": other_opt}, step=1)
        assert_same(state_of(other, other_opt), expected)
    plain, plain_opt = build(3, "plain")  # and the other way: a plain model's snapshot into the wrapper
    ckpt.save(2, {"model": plain, "optim": plain_opt})
    other, other_opt = build(4, wrapping)
    ckpt.restore({"model": other, "optim": other_opt}, step=2)
    assert_same(state_of(other, other_opt), state_of(plain, plain_opt))


@pytest.mark.parametrize("wrapping", ["ddp", "data_parallel", "compile", "ddp(compile)", "data_parallel_submodule"])
def test_a_snapshot_written_with_wrapper_prefixes_still_restores(
    group: None, wrapping: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"))
    model, opt = build(1, wrapping)
    expected = state_of(model, opt)
    with monkeypatch.context() as old_style:  # what moai-ckpt wrote before names were canonical
        old_style.setattr(capture_module, "canonical_state_dict", lambda m: m.state_dict())
        ckpt.save(1, {"model": model, "optim": opt})
    stored = {name.split("/", 1)[1] for name in ckpt.manifest(1).arrays if name.startswith("model/")}
    assert stored != set(PLAIN_NAMES)  # written under the wrapper's names
    for target in ("plain", wrapping, "compile(ddp)"):
        other, other_opt = build(2, target)
        ckpt.restore({"model": other, "optim": other_opt}, step=1)
        assert_same(state_of(other, other_opt), expected)


def test_a_model_that_does_not_fit_is_named_in_canonical_names(group: None, tmp_path: Path) -> None:
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"))
    model, _ = build(1, "plain")
    ckpt.save(1, {"model": model})
    smaller = Net()
    del smaller.block
    smaller.block = nn.Sequential(nn.Identity(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in smaller.state_dict().items()}
    with pytest.raises(moai_ckpt.StateMismatchError, match=r"in snapshot only \['block.0.bias'") as info:
        ckpt.restore({"model": ddp(smaller)})
    assert "'module.block" not in str(info.value)  # the model's names as the snapshot would hold them
    assert all(torch.equal(before[k], v) for k, v in smaller.state_dict().items())


def test_the_log_names_parameters_canonically(group: None) -> None:
    for wrapping in WRAPPINGS:
        names, _, _ = parameters_of({"model": WRAPPINGS[wrapping](Net())})
        assert names == [f"model.{n}" for n, _ in Net().named_parameters()], wrapping


@pytest.mark.slow
def test_a_compiled_model_trains_and_its_snapshot_serves_the_plain_model_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"))
    ckpt.save(2, {"model": compiled})
    assert "model/0.weight" in ckpt.manifest(2).arrays
    plain = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    ckpt.restore({"model": plain})  # for evaluation
    assert_same(dict(plain.state_dict()), dict(model.state_dict()))
    plain.eval()
    model.eval()
    assert torch.equal(plain(x), model(x))
    model.train()
    with torch.no_grad():
        plain[0].weight.mul_(2.0)
    ckpt.save(3, {"model": plain})
    ckpt.restore({"model": compiled})  # and back into the compiled model, which runs on
    assert torch.equal(model[0].weight, plain[0].weight)
    compiled(x).square().mean().backward()
    assert model[0].weight.grad is not None


def _train_wrapped(run: moai_ckpt.Run, run_dir: str, wrapping: str, total: int) -> dict[str, Any]:
    """A small run that tracks the model under ``wrapping`` (the wrapper itself)."""
    torch.manual_seed(0)
    net = Net()
    model = WRAPPINGS[wrapping](net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run.track(model=model, optim=opt)
    run.sampler(40, 8, seed=2)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    for _ in run.steps(total):
        loss = model(x[run.batch()]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.record(loss=loss)
    report = run.report
    return {"state": state_of(net, opt), "replayed": run.replayed, "bitwise": report is not None and report.bitwise}


def test_a_run_tracking_a_wrapper_resumes_under_another_wrapping_and_replays_bitwise(tmp_path: Path) -> None:
    train = moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=3, snapshot_at_end=False)(_train_wrapped)
    reference = train(run_dir=str(tmp_path / "reference"), wrapping="plain", total=7)
    run_dir = str(tmp_path / "run")
    train(run_dir=run_dir, wrapping="data_parallel", total=5)  # snapshots 0 and 3; steps 4, 5 in the log
    resumed = train(run_dir=run_dir, wrapping="checkpoint", total=7)  # restored and replayed as another wrapping
    assert resumed["replayed"] == 2 and resumed["bitwise"]
    assert_same(resumed["state"], reference["state"])
