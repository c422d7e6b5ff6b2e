"""Rank-local state: tensors taken as replicated are checked, and those that differ are kept per rank.

DDP + BatchNorm without SyncBatchNorm (each rank's running statistics follow its own batch), a
per-rank EMA copy of the model (``AveragedModel`` averaging buffers too) and a plain per-rank
tensor, on real gloo process groups (`tests.scenarios.ranklocal_scenarios`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

import moai_ckpt
from moai_ckpt.format import Manifest
from moai_ckpt.layout import snapshot_dir
from moai_ckpt.ranklocal import choose, copy_name, find_rank_local, split_pieces
from moai_ckpt.sharding import Piece
from moai_ckpt.testing.dist import RankResult, launch

ROOT = Path(__file__).resolve().parents[2]
BUFFERS = {f"model/{b}.{s}" for b in ("b1", "b2") for s in ("running_mean", "running_var")}


def ok(results: list[RankResult]) -> list[dict[str, Any]]:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-3000:]}"
    return [r.value for r in results]


# -- the pieces, without processes -------------------------------------------------------------------


def test_only_arrays_whose_holders_sent_different_digests_become_rank_local() -> None:
    piece = Piece("float32", (4,), 0, 4)
    pieces = [{"m/a": piece, "m/b": piece, "m/c": piece, "m/a.rank1": piece}, {"m/a": piece, "m/b": piece}, {}]
    digests = [{"m/a": "x", "m/b": "y", "m/c": "z"}, {"m/a": "X", "m/b": "y"}, {}]
    found = find_rank_local(pieces, digests)
    assert found == {"m/a": {0: "m/a", 1: "m/a.rank1_"}}  # a name another array has is not reused
    split = split_pieces(pieces, found)
    assert "m/a" in split[0] and "m/a" not in split[1] and split[1]["m/a.rank1_"] == piece
    assert copy_name("G/x", 2, {"g/x.rank2"}) == "G/x.rank2_"  # names that differ in case only collide


def test_a_restore_takes_each_ranks_own_copy_on_the_same_world_size_else_the_lowest_ranks() -> None:
    stored = {"m/a": {0: "m/a", 1: "m/a.rank1"}, "m/b": {1: "m/b", 2: "m/b.rank2"}}
    same, choice = choose(stored, {"m/a", "m/b", "m/c"}, saved_world_size=3, world_size=3, rank=1)
    assert same == {"m/a": "m/a.rank1", "m/b": "m/b"} and choice.per_rank and choice.copies == {"m/a": 1, "m/b": 1}
    other, choice = choose(stored, {"m/a", "m/b"}, saved_world_size=3, world_size=2, rank=1)
    assert other == {"m/a": "m/a", "m/b": "m/b"} and choice.copies == {"m/a": 0, "m/b": 1}
    assert not choice.per_rank and "saved on 3 ranks, restored on 2" in choice.describe()
    assert choose(stored, {"m/c"}, saved_world_size=3, world_size=3, rank=0)[1].describe() == "no rank-local state"


def test_a_manifest_whose_rank_local_copies_are_not_its_arrays_is_refused() -> None:
    array = {"path": "m/a", "dtype": "float32", "shape": [2], "chunks": [2]}
    base = {"step": 1, "created": "now", "objects": {}, "world_size": 2}
    arrays = {"m/a": array, "m/a.rank1": {**array, "path": "m/a.rank1"}}
    good = Manifest.model_validate({**base, "arrays": arrays, "rank_local": {"m/a": {"0": "m/a", "1": "m/a.rank1"}}})
    assert good.rank_local == {"m/a": {0: "m/a", 1: "m/a.rank1"}}
    for bad in (
        {"m/a": {"0": "m/a", "1": "m/elsewhere"}},  # a copy that is no array
        {"m/a": {"0": "m/a.rank1", "1": "m/a"}},  # the lowest rank's copy is not the plain name
        {"m/a": {"0": "m/a", "5": "m/a.rank1"}},  # a rank the save did not have
        {"m/a": {"0": "m/a"}},  # one copy is no rank-local array
    ):
        with pytest.raises(ValueError, match="rank-local array"):
            Manifest.model_validate({**base, "arrays": arrays, "rank_local": bad})


# -- Checkpointer on 2 gloo ranks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, str]]]:
    """A 2-rank DDP + BatchNorm snapshot with a per-rank EMA and a per-rank tensor; each rank's tensors."""
    run_dir = str(tmp_path_factory.mktemp("rank-local") / "run")
    values = ok(launch("tests.scenarios.ranklocal_scenarios:save_rank_local", 2, run_dir=run_dir))
    return run_dir, [v["state"] for v in values]


def sha256_of(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.slow
def test_tensors_that_differ_between_ranks_are_stored_per_rank_and_replicated_ones_once(
    saved: tuple[str, list[dict[str, str]]],
) -> None:
    run_dir, (rank0, rank1) = saved
    differ = {name for name in rank0 if rank0[name] != rank1[name]}
    # the job has rank-local state: BatchNorm buffers, the EMA's copies of them, the per-rank tensor
    assert BUFFERS | {"ema/module.b1.running_mean", "local/seen"} <= differ
    manifest = moai_ckpt.Checkpointer(run_dir).manifest()
    assert manifest.format_version == moai_ckpt.FORMAT_VERSION
    assert set(manifest.rank_local) == differ  # exactly those; DDP's parameters are stored once
    group = zarr.open_group(os.path.join(run_dir, snapshot_dir(3)), mode="r")
    for name, copies in manifest.rank_local.items():
        assert copies[0] == name  # plain zarr sees rank 0's copy, the one DDP uses, under the plain name
        assert sha256_of(group[name][...]) == rank0[name]
        assert sha256_of(group[copies[1]][...]) == rank1[name]
    assert moai_ckpt.Checkpointer(run_dir).verify().ok


@pytest.mark.slow
def test_each_rank_restores_its_own_copy_on_the_same_world_size(saved: tuple[str, list[dict[str, str]]]) -> None:
    run_dir, states = saved
    values = ok(launch("tests.scenarios.ranklocal_scenarios:restore_rank_local", 2, run_dir=run_dir))
    for rank, value in enumerate(values):
        assert value["step"] == 3
        mismatches = sorted(k for k in states[rank] if value["state"].get(k) != states[rank][k])
        assert mismatches == [], f"rank {rank}"  # parameters, buffers, EMA, optimizer, scheduler
        assert value["per_rank"] and set(value["copies"].values()) == {rank}
        assert "each rank restored its own copy" in value["describe"]


@pytest.mark.slow
def test_restoring_onto_one_rank_takes_rank_0s_copy_and_says_so(
    saved: tuple[str, list[dict[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    from tests.scenarios.ranklocal_scenarios import restore_rank_local

    run_dir, (rank0, _) = saved
    with caplog.at_level(logging.INFO, logger="moai_ckpt"):
        value = restore_rank_local(run_dir)  # this process alone, into the plain (unwrapped) model
    assert sorted(k for k in rank0 if value["state"].get(k) != rank0[k]) == []
    assert not value["per_rank"] and set(value["copies"].values()) == {0}
    assert set(value["copies"]) >= BUFFERS
    logged = [r.getMessage() for r in caplog.records if "rank-local" in r.getMessage()]
    assert logged and "saved on 2 ranks, restored on 1: every rank took rank 0's copy" in logged[0]


@pytest.mark.slow
def test_a_replay_on_another_world_size_reports_that_it_took_rank_0s_copy(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    ok(
        launch("tests.scenarios.ranklocal_scenarios:train_once", 2, run_dir=run_dir, total=8)
    )  # snapshots 0, 5; log 6..8
    from tests.scenarios.ranklocal_scenarios import train_once

    out = train_once(run_dir, 10)  # one process: restores step 5, replays 6..8 on the changed placement
    assert out["base"] == 5 and out["replayed"] == 3 and out["strict"] is False
    assert set(out["rank_local"]) >= BUFFERS
    assert all(v == "rank 0's copy (saved on 2 ranks, restored on 1)" for v in out["rank_local"].values())
    (written,) = Path(run_dir, "reports").glob("replay-*.json")
    assert json.loads(written.read_text())["rank_local"] == out["rank_local"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on the GPU machine)")
def test_on_two_gpus_over_nccl_device_digests_find_the_rank_local_state(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    states = [
        v["state"]
        for v in ok(launch("tests.scenarios.ranklocal_scenarios:save_rank_local", 2, run_dir=run_dir, backend="nccl"))
    ]
    differ = {name for name in states[0] if states[0][name] != states[1][name]}
    manifest = moai_ckpt.Checkpointer(run_dir).manifest()
    assert differ >= BUFFERS
    assert set(manifest.rank_local) == differ  # found by device digests: nothing missed, nothing extra
    assert "cuda" in manifest.device_types  # (the RNG states are CPU tensors)
    values = ok(launch("tests.scenarios.ranklocal_scenarios:restore_rank_local", 2, run_dir=run_dir, backend="nccl"))
    for rank, value in enumerate(values):
        assert sorted(k for k in states[rank] if value["state"].get(k) != states[rank][k]) == [], f"rank {rank}"
        assert value["per_rank"] and set(value["copies"].values()) == {rank}


# -- a DDP + BatchNorm job under torchrun, SIGKILLed from outside three times ------------------------


TOTAL, KILLS = 34, 3


def torchrun(run_dir: Path, events: Path, restarts: int, log: Any) -> subprocess.Popen[bytes]:
    events.mkdir(parents=True, exist_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if k != "MOAI_CKPT_FAULTS"},
        "OMP_NUM_THREADS": "1",
        "RANKLOCAL_STEP_PAUSE": "0.03",
        # restarted workers must not reuse the first attempt's store addresses (pytorch/pytorch#135712)
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        f"--max-restarts={restarts}", "-m", "tests.scenarios.ranklocal_scenarios", str(run_dir), str(events), str(TOTAL),
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_events(events: Path, rank: int) -> list[dict[str, Any]]:
    path = events / f"events-{rank}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is skipped


def finish(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 240) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-4000:]


def pids_at(events: Path, attempt: int, step: int, proc: subprocess.Popen[bytes], deadline: float) -> list[int]:
    """Each rank's worker pid in ``attempt``, once rank 0 has run ``step`` in it."""
    while time.monotonic() < deadline and proc.poll() is None:
        per_rank = [[e for e in read_events(events, r) if e["attempt"] == attempt] for r in range(2)]
        if all(per_rank) and any(e.get("step", -1) >= step for e in per_rank[0]):
            return [ranks[0]["pid"] for ranks in per_rank]
        time.sleep(0.005)
    raise AssertionError(f"attempt {attempt} never reached step {step} (torchrun exit code {proc.poll()})")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_ddp_batchnorm_job_killed_three_times_ends_bitwise_equal_buffers_included(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    with open(tmp_path / "reference.log", "wb") as log:
        finish(torchrun(reference / "run", reference, 0, log), tmp_path / "reference.log")
    faulty = tmp_path / "faulty"
    rng = random.Random(20261212)
    targets = [6 + 9 * i + rng.randrange(4) for i in range(KILLS)]  # steps 6..9, 15..18, 24..27 of 34
    with open(tmp_path / "faulty.log", "wb") as log:
        proc = torchrun(faulty / "run", faulty, KILLS, log)
        try:
            for attempt, target in enumerate(targets):
                pids = pids_at(faulty, attempt, target, proc, time.monotonic() + 180)
                time.sleep(rng.uniform(0.0, 0.03))  # anywhere in the step: forward, backward, logging, snapshot
                os.kill(pids[rng.randrange(2)], signal.SIGKILL)
        finally:
            finish(proc, tmp_path / "faulty.log")

    for rank in range(2):
        ref = json.loads((reference / f"result-{rank}.json").read_text())
        out = json.loads((faulty / f"result-{rank}.json").read_text())
        differ = sorted(k for k in ref["state"] if out["state"].get(k) != ref["state"][k])
        assert differ == [], f"rank {rank}: final state differs in {differ}"  # buffers included
        assert set(ref["state"]) >= BUFFERS and len(ref["state"]) == len(out["state"])
        ran = read_events(faulty, rank)
        assert {e["attempt"] for e in ran} == set(range(KILLS + 1))  # killed three times, restarted three times
        losses = {str(e["step"]): e["loss"] for e in read_events(reference, rank) if "step" in e}
        assert len(losses) == TOTAL
        steps = [e for e in ran if "step" in e]
        assert {e["step"] for e in steps} == set(range(1, TOTAL + 1))
        assert [e["step"] for e in steps if e["loss"] != losses[str(e["step"])]] == []  # live and replayed
        for start in (e for e in ran if "start" in e and e["base"] > 0):
            # every restart from a snapshot of the job restored each rank's own buffers, and said so
            assert set(start["rank_local"]) >= BUFFERS and set(start["rank_local"].values()) == {"each rank's own copy"}
        assert any("start" in e and e["base"] > 0 for e in ran if e["attempt"] == KILLS)
