"""Exact digests of the whole tracked state: every entry named, any one-bit change seen, in the log.

The units first (entries and their names, the digests, the compact log blobs, the check); then
real processes (`tests.scenarios.state_scenario`): a one-bit change planted in a buffer or an optimizer
tensor during a replay is named by the check, one process and two DDP ranks; an unchanged job
killed and restarted passes every exact check; a log written without state digests is checked as
before; snapshots are taken during a replay, so a second kill replays only what follows them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moai_ckpt
from moai_ckpt.digest import SMALL_WORDS, _batched_sums, _large_sums, device_sums, word_view
from moai_ckpt.testing.dist import launch
from replay import statedigest
from replay.check import compare
from replay.log import Digests, LogWriter, StepRecord, history, read_log
from replay.statedigest import capture_state
from tests.scenarios.state_scenario import FLIP_ENV, Net, entry_tensor, flip_one_bit

BLOCK = 4096  # sizes around a round number of words
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tracked() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sampler = moai_ckpt.GlobalSampler(32, 8)
    x = torch.randn(8, 8)
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "_data": sampler, "extras": {"best": 1.5}}


def _digests(tracked: dict[str, Any]) -> dict[str, str]:
    pending = capture_state(tracked)
    return dict(zip(pending.names, pending.wait(), strict=True))


# -- entries, names, digests ------------------------------------------------------------------------


def test_every_tensor_and_every_tracked_object_has_a_canonical_named_entry() -> None:
    tracked = _tracked()
    names = list(_digests(tracked))
    assert names[:2] == ["model", "model/fc1.weight"]
    assert {
        "model/b1.running_var",
        "model/b1.num_batches_tracked",
        "optim/state.3.exp_avg_sq",
        "optim/state.0.step",
    } <= set(names)
    assert {"optim", "sched", "scaler", "scaler/scale", "scaler/_growth_tracker", "_data", "extras"} <= set(names)
    assert len(names) == len(set(names))
    wrapped = {**tracked, "model": nn.DataParallel(tracked["model"])}  # adds "module." to every key
    assert _digests(wrapped) == _digests(tracked)  # the same names and digests, wrapper or not


def test_a_one_bit_change_in_any_tensor_changes_exactly_its_own_entry() -> None:
    tracked = _tracked()
    before = _digests(tracked)
    tensor_entries = [n for n in before if "/" in n]
    params = list(tracked["model"].parameters())
    # parameters and buffers, Adam's three per parameter, the scaler's scale and growth tracker
    assert len(tensor_entries) == len(tracked["model"].state_dict()) + 3 * len(params) + 2
    for entry in tensor_entries:
        flip_one_bit(entry_tensor(tracked, entry))
        after = _digests(tracked)
        assert [n for n in before if before[n] != after[n]] == [entry]
        flip_one_bit(entry_tensor(tracked, entry))
    assert _digests(tracked) == before


def test_a_change_in_state_that_is_not_a_tensor_changes_its_objects_entry() -> None:
    tracked = _tracked()
    before = _digests(tracked)
    tracked["sched"].last_epoch += 1
    tracked["_data"].advance()
    tracked["extras"]["best"] = 1.25
    group = tracked["optim"].param_groups[0]
    group["lr"] = math.nextafter(group["lr"], math.inf)  # one unit in the last place
    after = _digests(tracked)
    assert [n for n in before if before[n] != after[n]] == ["optim", "sched", "_data", "extras"]


def test_device_word_sums_see_a_flip_of_any_bit_and_words_moved_to_other_positions() -> None:
    # the device algorithm, run on CPU tensors: every bit of the first and last byte, in sizes
    # that take each word width, small ones reduced together, and the path of large tensors
    sizes = [(3, torch.uint8), (5, torch.float16), (7, torch.float32), (2 * BLOCK + 3, torch.float32)]
    sizes.append((SMALL_WORDS + BLOCK + 1, torch.float32))
    tensors = [torch.arange(numel).to(dtype) for numel, dtype in sizes]
    base = device_sums(tensors)
    for k, t in enumerate(tensors):
        raw = t.view(torch.uint8)
        for index in (0, raw.numel() - 1):
            for bit in range(8):
                raw[index] ^= 1 << bit
                changed = (device_sums(tensors) != base).any(1).tolist()
                assert changed == [i == k for i in range(len(tensors))], (sizes[k], index, bit)
                raw[index] ^= 1 << bit
    for n in (64, SMALL_WORDS + 64):  # batched and alone
        t = torch.zeros(n, dtype=torch.int32)
        t[0], moved = 5, t.clone()
        moved[0], moved[1] = 0, 5  # the same word, next door: the plain sum cannot tell
        a, b = device_sums([t]).tolist()[0], device_sums([moved]).tolist()[0]
        assert a[0] == b[0] and a[1] != b[1]


def test_two_ranks_that_counted_different_samples_as_often_have_different_device_sums() -> None:
    # a per-rank tally (int64, small counts): equal totals at other positions, and the index sums
    # of the two sets equal as well, which any sum weighted linearly by position misses
    rank0, rank1 = torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
    rank0[[1, 4, 10]] += 1
    rank1[[2, 3, 10]] += 1
    a, b = device_sums([rank0]).tolist()[0], device_sums([rank1]).tolist()[0]
    assert a[0] == b[0] and a[1] != b[1]


def test_a_tensor_has_the_same_device_sums_alone_and_reduced_with_others() -> None:
    big, small = torch.randn(SMALL_WORDS + 5), torch.randn(2 * BLOCK + 1)
    together = device_sums([small, big, small.clone()])
    assert torch.equal(together[0], together[2]) and torch.equal(together[1], device_sums([big])[0])
    assert torch.equal(_batched_sums([word_view(big)])[0], _large_sums(word_view(big)))  # both ways agree
    assert torch.equal(_batched_sums([word_view(small)])[0], _large_sums(word_view(small)))
    with_empty = device_sums([torch.zeros(0), small, torch.zeros(0)])  # no bytes: both sums zero
    assert with_empty[[0, 2]].eq(0).all() and torch.equal(with_empty[1], together[0])


def test_a_grad_scaler_is_digested_from_its_tensors_without_reading_them_on_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracked = _tracked()
    before = _digests(tracked)

    def forbidden(*_: Any) -> None:
        raise AssertionError("a CUDA scaler's state_dict() and get_scale() wait for the device")

    monkeypatch.setattr(torch.amp.GradScaler, "state_dict", forbidden)
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", forbidden)
    assert _digests(tracked) == before


def test_digests_and_names_round_trip_through_their_compact_blobs() -> None:
    digests = [*_digests(_tracked()).values(), "meta", "mix64:10:ffffffffffffffff:0000000000000001"]
    packed = statedigest.pack(digests)
    assert statedigest.unpack(packed) == digests
    assert len(packed) < len("".join(digests)) / 2
    per_rank = [["a", "b"], ["a", "b"], ["a", "c"], ["a", "b"]]
    blob = statedigest.names_blob(per_rank)
    assert json.loads(blob) == [["a", "b"], 0, ["a", "c"], 0] and statedigest.names_of(blob) == per_rank
    for bad in (packed[:-3], b"\x07"):
        with pytest.raises(ValueError):
            statedigest.unpack(bad)
    for bad_names in (b"{}", b"[1]", b'[["a"], 5]'):
        with pytest.raises(ValueError):
            statedigest.names_of(bad_names)


def test_a_check_names_the_first_differing_state_entry_by_rank_after_the_inputs() -> None:
    logged = StepRecord(step=3, samples=[1, 2], hparams={"lr": 0.1}, digests=Digests(loss=1.0, grad_norm=2.0))
    names = ["model", "model/w", "model/b1.running_var", "optim/state.0.exp_avg"]
    before = [(names, ["d0", "d1", "d2", "d3"]), (names, ["d0", "d1", "e2", "d3"])]
    same = compare(logged, logged, [1.0], [1.0], ["model.w"], (before, before))
    assert same.bitwise and same.state_entries_differing == 0
    after = [(names, ["d0", "d1", "d2", "d3"]), (names, ["d0", "d1", "x2", "x3"])]
    check = compare(logged, logged, [1.0], [1.0], ["model.w"], (before, after))
    assert check.mismatches == ["state model/b1.running_var (rank 1)", "state optim/state.0.exp_avg (rank 1)"]
    assert "state model/b1.running_var (rank 1)" in check.describe() and check.state_entries_differing == 2
    changed = logged.model_copy(update={"hparams": {"lr": 0.2}, "digests": Digests(loss=1.5, grad_norm=2.0)})
    check = compare(logged, changed, [1.0], [2.0], ["model.w"], (before, after))
    assert check.mismatches[:3] == ["hparam lr", "loss", "state model/b1.running_var (rank 1)"]
    assert check.mismatches[-1] == "param model.w"
    fewer = [(names[:3], ["d0", "d1", "d2"]), before[1]]  # an entry only the log holds
    assert compare(logged, logged, [], [], [], (before, fewer)).first == "state optim/state.0.exp_avg (rank 0)"


# -- real processes ---------------------------------------------------------------------------------


def scenario(run_dir: Path | str, total: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in (FLIP_ENV, "MOAI_CKPT_FAULTS", "MOAI_CKPT_STORAGE_FAULTS"):
        if name not in (env or {}):
            full.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "tests.scenarios.state_scenario", str(run_dir), str(total)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=full,
    )


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def kill_at(tmp_path: Path, at: str, step: int) -> dict[str, str]:
    once = tmp_path / f"{at}-{step}.fired"
    return {"MOAI_CKPT_FAULTS": json.dumps([{"at": at, "step": step, "action": "kill", "once": str(once)}])}


def refuse_snapshot(step: int) -> dict[str, str]:
    """The storage refuses (once, permanently) the writes of the snapshot of ``step``."""
    paths = [f"*snapshots/{step:012d}/*"]
    return {"MOAI_CKPT_STORAGE_FAULTS": json.dumps({"permanent_nth": [1], "ops": ["write"], "paths": paths})}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return result_of(scenario(tmp_path_factory.mktemp("ref") / "run", 14))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 steps: snapshots of 0, 4, 8; steps 9 and 10 in the log after the snapshot of 8."""
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    result_of(scenario(run_dir, 10))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry",
    ["model/b1.running_var", "model/b1.num_batches_tracked", "optim/state.2.exp_avg_sq", "optim/state.5.exp_avg"],
)
def test_a_one_bit_change_planted_in_a_buffer_or_optimizer_tensor_during_a_replay_is_named(
    tmp_path: Path, logged_run: Path, entry: str
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(logged_run, run_dir)
    out = result_of(scenario(run_dir, 12, {FLIP_ENV: f"{entry}@10"}))
    # step 9 replays bitwise; step 10 holds the flipped bit, and nothing else differs
    assert out == {"diverged_at": 10, "first": f"state {entry} (rank 0)", "mismatches": [f"state {entry} (rank 0)"]}


@pytest.mark.slow
def test_a_killed_job_replays_every_step_bitwise_with_its_whole_state_checked(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    killed = scenario(run_dir, 14, kill_at(tmp_path, "forward", 11))
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = result_of(scenario(run_dir, 14))
    assert out["first_step"] == 9 and out["replayed"] == 2  # steps 9 and 10 replayed, every entry compared
    assert out["digest"] == reference["digest"]
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    assert all(r.digests.exact for r in history(storage).values())
    contents = read_log(storage, 12)
    names = statedigest.names_of(contents.blob(contents.headers[13].state or ""))
    assert "model/b1.running_var" in names[0] and "_data" in names[0]


def as_format_2(run_dir: Path, base: int, loss_of: dict[int, float] | None = None) -> None:
    """Rewrite the log after ``base`` as log format 2 wrote it: no state names, no state digests."""
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    contents = read_log(storage, base)
    old = []
    for r in contents.records:
        digests = r.digests.model_copy(update={"exact": None, "loss": (loss_of or {}).get(r.step, r.digests.loss)})
        old.append(r.model_copy(update={"digests": digests}))
        contents.headers[r.step] = contents.headers[r.step].model_copy(update={"state": None, "version": 2})
    storage.delete_prefix(f"log/{base:012d}")
    LogWriter(storage, base).copy(old, contents)
    rewritten = read_log(storage, base)
    assert not any(r.digests.exact for r in rewritten.records)
    assert {h.version for h in rewritten.headers.values()} == {2}


@pytest.mark.slow
def test_a_log_written_without_state_digests_is_checked_as_before(tmp_path: Path, logged_run: Path) -> None:
    unseen, tampered = tmp_path / "unseen", tmp_path / "tampered"
    for run_dir in (unseen, tampered):
        shutil.copytree(logged_run, run_dir)
    as_format_2(unseen, 8)
    out = result_of(scenario(unseen, 12, {FLIP_ENV: "model/b1.running_var@10"}))
    assert out["replayed"] == 2  # nothing to compare the flipped buffer with: loss and norms agree
    as_format_2(tampered, 8, loss_of={9: 0.5})
    out = result_of(scenario(tampered, 12))
    assert out["diverged_at"] == 9 and out["first"] == "loss"  # the other quantities are checked


@pytest.mark.slow
def test_a_second_kill_replays_only_the_steps_after_the_snapshot_the_first_restart_took(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    # first run: the snapshot of step 8 is refused, then a kill in step 11: the log after 4 holds 5..10
    first = scenario(f"faulty::file://{run_dir}", 14, {**kill_at(tmp_path, "forward", 11), **refuse_snapshot(8)})
    assert first.returncode == -9, first.stderr[-3000:]
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    assert ckpt.steps() == [0, 4] and read_log(ckpt.storage, 4).last_step == 10
    # first restart: replays 5.., snapshots step 8 while replaying, and is killed in step 10
    second = scenario(run_dir, 14, kill_at(tmp_path, "forward", 10))
    assert second.returncode == -9, second.stderr[-3000:]
    assert ckpt.steps() == [0, 4, 8]
    assert [r.step for r in read_log(ckpt.storage, 8).records] == [9, 10]  # carried to the new base
    # second restart: from step 8, replaying 9 and 10 only
    out = result_of(scenario(run_dir, 14))
    assert out["first_step"] == 9 and out["replayed"] == 2
    assert out["digest"] == reference["digest"]


# -- two DDP ranks ------------------------------------------------------------------------------------


TARGET = "tests.scenarios.state_scenario:ranks"


@pytest.mark.slow
def test_ddp_ranks_that_agree_share_one_digest_blob_and_a_flip_on_rank_1_is_named_with_its_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LayerNorm: every rank holds the same state (BatchNorm's per-rank statistics are rank-local
    # state, which snapshots restore per rank: see docs/guarantees.md)
    run_dir = str(tmp_path / "run")
    for name in (FLIP_ENV, "MOAI_CKPT_FAULTS", "MOAI_CKPT_STORAGE_FAULTS"):
        monkeypatch.delenv(name, raising=False)
    first = launch(TARGET, 2, run_dir=run_dir, total=10, norm="layer")
    assert all(r.returncode == 0 for r in first), first[0].output[-3000:]
    record = history(moai_ckpt.Checkpointer(run_dir).storage)[10]
    assert record.digests.exact is not None and len(record.digests.exact) == 1  # the ranks agree: one blob
    monkeypatch.setenv(FLIP_ENV, "optim/state.2.exp_avg_sq@10@1")
    restarted = launch(TARGET, 2, run_dir=run_dir, total=12, norm="layer")
    for r in restarted:
        assert r.returncode == 0 and r.value is not None, r.output[-3000:]
        assert r.value["diverged_at"] == 10  # step 9 replayed bitwise on both ranks
        assert r.value["mismatches"] == ["state optim/state.2.exp_avg_sq (rank 1)"]


@pytest.mark.slow
def test_on_another_world_size_a_snapshot_due_during_the_replay_is_taken_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    for name in (FLIP_ENV, "MOAI_CKPT_FAULTS"):
        monkeypatch.delenv(name, raising=False)
    for key, value in refuse_snapshot(8).items():
        monkeypatch.setenv(key, value)
    first = launch(TARGET, 2, run_dir=f"faulty::file://{run_dir}", total=10)
    assert all(r.returncode == 0 for r in first), first[0].output[-3000:]
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    assert ckpt.steps() == [0, 4]
    monkeypatch.delenv("MOAI_CKPT_STORAGE_FAULTS")
    out = result_of(scenario(run_dir, 10))  # one process: the replay of 5..10 drifts, unchecked bitwise
    assert out["replayed"] == 6
    assert ckpt.steps() == [0, 4, 10]  # not of step 8, which the 2-rank log describes; after the replay
