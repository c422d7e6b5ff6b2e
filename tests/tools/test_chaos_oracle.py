"""The chaos oracle's findings: every differing entry named, and a job that is not reproducible
from its start told apart from a moai-ckpt failure, with what to seed."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

import moai_ckpt
from moai_ckpt.tools.chaos import Scenario
from moai_ckpt.tools.chaos.diff import diff_final, first_step, unused_generators
from moai_ckpt.tools.chaos.oracle import judge
from moai_ckpt.tools.chaos.runner import RunOutcome

STEPS = 4


def _state(seed: int, nudge: float = 0.0, epoch: int = 1) -> dict[str, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(1 + nudge)  # a relative change that differs on every machine
    return {"model": model, "optim": opt, "extra": {"epoch": epoch, "nested": {"a": [1, 2], "b": "x"}}}


def _save(run_dir: Path, state: dict[str, object], rng_seed: int) -> None:
    torch.manual_seed(rng_seed)
    np.random.seed(rng_seed)
    random.seed(rng_seed)
    with moai_ckpt.Checkpointer(str(run_dir)) as ckpt:
        ckpt.save(STEPS, state)


def test_the_final_state_diff_names_every_array_and_json_entry_that_differs(tmp_path: Path) -> None:
    _save(tmp_path / "a", _state(0), rng_seed=1)
    _save(tmp_path / "b", _state(0, nudge=1e-3, epoch=2), rng_seed=2)
    diff = diff_final(tmp_path / "a", tmp_path / "b", STEPS, exact=True)
    with moai_ckpt.Checkpointer(str(tmp_path / "a")) as ckpt:
        stored = set(ckpt.manifest(STEPS).arrays)
    model_arrays = {n for n in stored if n.startswith("model/")}
    float_model = model_arrays - {"model/1.num_batches_tracked"}
    named = {a.name for a in diff.arrays}
    assert float_model <= named  # every nudged model tensor is named, none summarised away
    assert "model/1.num_batches_tracked" not in named  # an integer the nudge left alone
    assert diff.rngs == ["_rng/numpy", "_rng/python", "_rng/torch_cpu"]  # seeded differently, named by generator
    assert diff.json_paths == ["extra/epoch"]  # not extra/nested, which is equal
    text = diff.describe()
    assert all(name in text for name in diff.names())
    training = {n for n in stored if not n.startswith("_rng")}  # the RNG states' arrays count as generators
    assert f"{len(named)} of {len(training)} arrays differ" in text
    weight = next(a for a in diff.arrays if a.name == "model/0.weight")
    assert 5e-4 < weight.rel < 2e-3  # the largest relative difference, per array


def test_identical_snapshots_have_no_difference(tmp_path: Path) -> None:
    _save(tmp_path / "a", _state(0), rng_seed=1)
    _save(tmp_path / "b", _state(0), rng_seed=1)
    diff = diff_final(tmp_path / "a", tmp_path / "b", STEPS, exact=True)
    assert diff.equal and diff.names() == [] and "bitwise equal" in diff.describe()


def _job(run_dir: Path, *, seed_numpy_inside: bool, build_before_seed: bool = False) -> None:
    """A small fault_tolerant job whose input noise comes from numpy's global generator."""

    @moai_ckpt.fault_tolerant(storage=str(run_dir), snapshot_every=2)
    def train(run: moai_ckpt.Run) -> None:
        if build_before_seed:
            model = torch.nn.Linear(4, 1)
            torch.manual_seed(0)
        else:
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 1)
        if seed_numpy_inside:
            np.random.seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run.track(model=model, optim=opt)
        for _ in run.steps(STEPS):
            x = torch.from_numpy(np.random.normal(size=(8, 4)).astype(np.float32))
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.record(loss=loss)

    train()


def _outcome(run_dir: Path) -> RunOutcome:
    return RunOutcome(run_dir=run_dir, storage=str(run_dir), finished=True)


def test_a_job_seeded_outside_its_training_function_is_reported_as_not_reproducible(tmp_path: Path) -> None:
    """As in the issue: numpy's global RNG seeded outside the function (differently in each process)."""
    for name, seed in (("reference", 1), ("faulty", 2)):
        np.random.seed(seed)  # what a `__main__` block would do, which the harness's workers never run
        _job(tmp_path / name, seed_numpy_inside=False)
    start = first_step(tmp_path / "reference", tmp_path / "faulty")
    assert not start.reproducible
    assert start.inputs == ["RNG state of numpy on rank0"]
    assert "np.random.seed(...) inside the training function" in start.detail
    assert "__main__" in start.detail

    scenario = Scenario(name="not-seeded", kwargs={"steps": STEPS}, steps=STEPS)
    verdict = judge(scenario, _outcome(tmp_path / "reference"), _outcome(tmp_path / "faulty"))
    checks = {c.name: c for c in verdict.checks}
    assert not checks["reproducible from its start"].ok
    assert "numpy" in checks["reproducible from its start"].detail
    final = checks["final state bitwise equal"]
    assert not final.ok
    for name in ("model/weight", "model/bias", "_rng/numpy"):
        assert name in verdict.differing and name in final.detail


def test_equal_inputs_with_other_results_point_at_the_initial_state(tmp_path: Path) -> None:
    for name in ("reference", "faulty"):
        torch.manual_seed(len(name))  # the model is built from a generator seeded only afterwards
        _job(tmp_path / name, seed_numpy_inside=True, build_before_seed=True)
    start = first_step(tmp_path / "reference", tmp_path / "faulty")
    assert not start.reproducible and "inputs are equal but its results differ" in start.detail
    assert "built before its seed is set" in start.detail


def test_a_job_seeded_inside_is_reproducible_and_a_generator_it_never_draws_from_may_differ(tmp_path: Path) -> None:
    for name, seed in (("reference", 1), ("faulty", 2)):
        np.random.seed(seed)
        random.seed(seed)  # Python's generator: left unseeded by the job, and never drawn from
        _job(tmp_path / name, seed_numpy_inside=True)
    unused = unused_generators(tmp_path / "reference", tmp_path / "faulty")
    assert ("rank0", "python") in unused and ("rank0", "numpy") not in unused
    start = first_step(tmp_path / "reference", tmp_path / "faulty", unused)
    assert start.reproducible and "equal the reference's" in start.detail
    assert not first_step(tmp_path / "reference", tmp_path / "faulty").reproducible  # it does differ
    scenario = Scenario(name="seeded", kwargs={"steps": STEPS}, steps=STEPS)
    verdict = judge(scenario, _outcome(tmp_path / "reference"), _outcome(tmp_path / "faulty"))
    assert verdict.ok, verdict.checks
    assert verdict.differing == [] and verdict.max_rel_diff == 0.0
    final = next(c for c in verdict.checks if c.name == "final state bitwise equal")
    assert "never drawn from in either run: _rng/python" in final.detail
