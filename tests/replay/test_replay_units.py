"""The replay package's pieces: batches as bytes, RNG states as bytes, step scalars, step checks."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moai_ckpt
from replay import codec
from replay.check import compare
from replay.log import Digests, StepRecord, history
from replay.stepstate import Hyperparameters, StepValues, load_rng_components, parameters_of, rng_components


def test_a_batch_round_trips_through_bytes_with_every_dtype_and_structure() -> None:
    batch = {
        "tokens": torch.arange(12).reshape(3, 4),
        "mask": torch.tensor([[True, False], [False, True], [True, True]]),
        "pixels": torch.randn(3, 2, 2).to(torch.bfloat16),
        "pair": (torch.zeros(3), 7),
        "name": "shard-0",
    }
    back, parts = codec.unpack(codec.pack(batch, [3]))
    assert parts == [3] and back["name"] == "shard-0" and back["pair"][1] == 7
    for key in ("tokens", "mask", "pixels"):
        assert back[key].dtype == batch[key].dtype and torch.equal(back[key], batch[key])
    assert torch.equal(back["pair"][0], batch["pair"][0])


def test_a_global_batch_splits_back_into_the_same_parts_or_evenly_on_another_world_size() -> None:
    parts = [{"x": torch.arange(3) + 10 * r} for r in range(2)]  # rank 0: 3 rows, rank 1: 3 rows
    parts[1]["x"] = torch.arange(5) + 10  # uneven: 3 and 5 rows
    joined, rows = codec.join(parts)
    assert rows == [3, 5] and joined["x"].shape == (8,)
    assert torch.equal(codec.part_of(joined, rows, 1, 2)["x"], parts[1]["x"])  # the recorded split
    thirds = [codec.part_of(joined, rows, r, 3)["x"] for r in range(3)]
    assert [len(t) for t in thirds] == [3, 3, 2] and torch.equal(torch.cat(thirds), joined["x"])


def test_every_rng_state_round_trips_through_bytes() -> None:
    gen = torch.Generator().manual_seed(5)
    moai_ckpt.register_generator("aug", gen)
    try:
        torch.manual_seed(1)
        np.random.seed(2)
        random.seed(3)
        np.random.standard_normal()  # leaves a cached gaussian in numpy's state
        random.gauss(0, 1)
        saved = rng_components()
        expected = (
            torch.rand(3),
            np.random.standard_normal(4),
            random.random(),
            random.gauss(0, 1),
            torch.rand(2, generator=gen),
        )
        torch.manual_seed(9)
        np.random.seed(9)
        random.seed(9)
        gen.manual_seed(9)
        assert load_rng_components(saved) == []
        again = (
            torch.rand(3),
            np.random.standard_normal(4),
            random.random(),
            random.gauss(0, 1),
            torch.rand(2, generator=gen),
        )
        assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
        assert expected[2:4] == again[2:4] and torch.equal(expected[4], again[4])
        assert load_rng_components({"cuda:7": b"\x00" * 16}) == ["cuda:7"] or torch.cuda.device_count() > 7
    finally:
        moai_ckpt.unregister_generator("aug")


def test_the_scalars_in_force_cover_every_param_group_and_the_loss_scale() -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01, "weight_decay": 0.0}],
        betas=(0.9, 0.95),
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    hp = Hyperparameters.capture({"optim": opt, "scaler": scaler, "model": model}, {"accumulation": 4})
    assert hp.host["optim.0.lr"] == 0.1 and hp.host["optim.1.lr"] == 0.01
    assert hp.host["optim.0.betas"] == [0.9, 0.95] and hp.host["optim.1.weight_decay"] == 0.0
    assert hp.host["scaler.scale"] == 256.0 and hp.host["accumulation"] == 4
    assert not any(k.endswith(".params") for k in hp.host)


def test_step_values_hold_each_parameter_norm_the_loss_and_the_grad_norm() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    names, params, sharded = parameters_of({"model": model})
    assert names == ["model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias"] and not any(sharded)
    norms, loss, grad_norm, extra = StepValues.capture(params, torch.tensor(2.5), 0.75, Hyperparameters()).read()
    assert norms == [float(torch.linalg.vector_norm(p)) for p in params]
    assert (loss, grad_norm, extra) == (2.5, 0.75, {})


def test_a_check_names_the_inputs_before_the_outputs() -> None:
    logged = StepRecord(
        step=3,
        samples=[1, 2],
        rng={"rank0": {"torch_cpu": "a" * 64}},
        hparams={"optim.0.lr": 0.1},
        digests=Digests(loss=1.0, grad_norm=2.0, state=float.hex(3.0)),
    )
    same = compare(logged, logged, [1.0, 2.0], [1.0, 2.0], ["w", "b"])
    assert same.bitwise and same.first is None
    changed = logged.model_copy(
        update={"hparams": {"optim.0.lr": 0.2}, "digests": Digests(loss=1.5, grad_norm=2.0, state=float.hex(3.0))}
    )
    check = compare(logged, changed, [1.0, 2.0], [1.0, 2.5], ["w", "b"])
    assert check.mismatches == ["hparam optim.0.lr", "loss", "param b"]
    assert check.loss_rel == pytest.approx(0.5) and check.worst_param == "b"


def test_time_based_snapshots_and_extra_scalars_reach_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import moai_ckpt.run.snapshots

    class Clock:
        """The run's clock, moved by the training loop: 0.05 s a step, whatever the machine's load."""

        now = 1000.0

        def monotonic(self) -> float:
            return self.now

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    clock = Clock()
    monkeypatch.setattr(moai_ckpt.run.snapshots, "time", clock)

    @moai_ckpt.fault_tolerant(
        storage=str(tmp_path / "run"), snapshot_every=None, snapshot_every_s=0.2, snapshot_at_end=False
    )
    def train(run: moai_ckpt.Run) -> None:
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run.track(model=model, optim=opt)
        for _ in run.steps(12):
            loss = model(torch.ones(1, 2)).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.hparam(accumulation=2)
            run.record(loss=loss)
            clock.now += 0.05

    train()
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"))
    steps = ckpt.steps()
    assert steps[0] == 0 and 2 <= len(steps) - 1 <= 3  # 0.6 s of steps, a snapshot once 0.2 s have passed
    assert all(b - a >= 4 for a, b in itertools.pairwise(steps[1:])), steps  # never sooner than 0.2 s
    records = history(ckpt.storage)
    assert sorted(records) == list(range(1, 13)) and all(r.hparams["accumulation"] == 2 for r in records.values())


def test_a_finished_loop_ends_with_a_snapshot_of_its_last_step(tmp_path: Path) -> None:
    @moai_ckpt.fault_tolerant(storage=str(tmp_path / "run"), snapshot_every=4)
    def train(run: moai_ckpt.Run) -> None:
        model = torch.nn.Linear(2, 1)
        run.track(model=model)
        for _ in run.steps(7):
            run.record(loss=model(torch.ones(1, 2)).sum())

    train()
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"))
    assert ckpt.steps() == [0, 4, 7]
    train()  # a second call finds nothing left to do
    assert ckpt.steps() == [0, 4, 7]


def test_a_grad_norm_that_is_a_dtensor_is_recorded_as_its_value(tmp_path: Path) -> None:
    """FSDP2's ``clip_grad_norm_`` returns a replicated DTensor; users pass it to ``run.record`` as is."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        grad_norm = distribute_tensor(torch.tensor(1.25), mesh, [Replicate()])
        _, loss, recorded, _ = StepValues.capture([], torch.tensor(2.0), grad_norm, Hyperparameters()).read()
    finally:
        dist.destroy_process_group()
    assert (loss, recorded) == (2.0, 1.25)


@pytest.mark.parametrize(
    "forge",
    [
        lambda s: {**s, "numpy": s["numpy"][:-1]},
        lambda s: {**s, "python": b"\xff" * len(s["python"])},
        lambda s: {**s, "torch_cpu": s["torch_cpu"][:100]},
    ],
    ids=["numpy truncated", "python garbage", "torch truncated"],
)
def test_a_forged_rng_state_in_the_log_is_refused_before_any_generator_moves(forge: Any) -> None:
    from replay.log import CorruptLogError
    from replay.stepstate import load_rng_components, rng_components

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    logged = rng_components()
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    before = rng_components()
    with pytest.raises(CorruptLogError, match="logged state of generator"):
        load_rng_components(forge(logged))
    assert rng_components() == before  # no generator moved, not even those listed first
