"""Collective snapshots on real gloo process groups: sharded save, resharded restore, dead ranks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import moai_ckpt
from moai_ckpt.layout import snapshot_dir
from moai_ckpt.testing.dist import RankResult, launch

pytestmark = pytest.mark.slow


def ok(results: list[RankResult]) -> list[dict]:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-3000:]}"
    return [r.value for r in results]


@pytest.fixture(scope="module")
def fsdp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A snapshot written by 4 ranks under FSDP2, and the full tensors it must hold."""
    base = tmp_path_factory.mktemp("fsdp4")
    run_dir, ref = str(base / "run"), str(base / "ref.npz")
    values = ok(launch("tests.scenarios.dist_scenarios:save", 4, run_dir=run_dir, ref_path=ref, mode="fsdp"))
    assert {v["world_size"] for v in values} == {4}
    return run_dir, ref


def test_a_sharded_save_writes_one_global_array_per_tensor_with_bytes_spread_over_ranks(fsdp4: tuple[str, str]) -> None:
    run_dir, _ = fsdp4
    ckpt = moai_ckpt.Checkpointer(run_dir)
    manifest = ckpt.manifest()
    assert manifest.world_size == 4
    assert manifest.arrays["model/0.weight"].shape == (10, 6)
    marker = ckpt.marker()
    assert [r.rank for r in marker.body.ranks] == [0, 1, 2, 3]
    index_sizes = [os.path.getsize(Path(run_dir, r.key)) for r in marker.body.ranks]
    assert all(size > 0 for size in index_sizes)
    assert ckpt.verify().ok
    # chunk boundaries sit on FSDP2's shard boundaries: 10 rows over 4 ranks are blocks of 3
    assert manifest.arrays["model/0.weight"].chunks[0] in (1, 3)


@pytest.mark.parametrize(
    ("mode", "world"), [("fsdp", 4), ("fsdp", 3), ("fsdp", 2), ("fsdp", 1), ("ddp", 3), ("ddp", 2), ("single", 1)]
)
def test_a_4_rank_fsdp_snapshot_restores_exactly_onto_any_placement(
    fsdp4: tuple[str, str], mode: str, world: int
) -> None:
    run_dir, ref = fsdp4
    values = ok(launch("tests.scenarios.dist_scenarios:restore", world, run_dir=run_dir, ref_path=ref, mode=mode))
    for v in values:
        assert v["step"] == 2
        assert v["mismatches"] == [] and v["extra"] == [] and v["compared"] > 0
        assert v["sampler"]["samples_consumed"] == 32
    assert len({tuple(v["next_batch"]) for v in values}) == 1
    if mode == "fsdp" and world > 1:
        full = sum(v["bytes_read"] for v in values)
        largest = max(v["bytes_read"] for v in values)
        assert largest < full, "each rank reads its own regions, not everything"


def test_a_sharded_save_async_through_writer_processes_restores_exactly(tmp_path: Path) -> None:
    run_dir, ref = str(tmp_path / "run"), str(tmp_path / "ref.npz")
    saved = ok(
        launch("tests.scenarios.dist_scenarios:save", 2, run_dir=run_dir, ref_path=ref, mode="fsdp", persist="process")
    )
    assert [v["persist"] for v in saved] == ["process", "process"]
    assert all(v["bytes_written"] > 0 for v in saved)  # each rank's writer process wrote its rows
    values = ok(launch("tests.scenarios.dist_scenarios:restore", 2, run_dir=run_dir, ref_path=ref, mode="ddp"))
    for v in values:
        assert v["step"] == 2 and v["mismatches"] == [] and v["extra"] == [] and v["compared"] > 0


def test_a_ddp_snapshot_restores_under_fsdp(tmp_path: Path) -> None:
    run_dir, ref = str(tmp_path / "run"), str(tmp_path / "ref.npz")
    saved = ok(launch("tests.scenarios.dist_scenarios:save", 2, run_dir=run_dir, ref_path=ref, mode="ddp"))
    written = [v["bytes_written"] for v in saved]
    assert all(w > 0 for w in written), f"replicated bytes are spread over both ranks: {written}"
    values = ok(launch("tests.scenarios.dist_scenarios:restore", 3, run_dir=run_dir, ref_path=ref, mode="fsdp"))
    assert all(v["mismatches"] == [] and v["step"] == 2 for v in values)


def test_a_rank_dying_mid_save_fails_the_save_everywhere_and_commits_nothing(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    results = launch("tests.scenarios.dist_scenarios:save_with_dying_rank", 3, run_dir=run_dir, victim=1, timeout=120)
    assert results[1].returncode == 17
    for r in (results[0], results[2]):
        assert r.returncode == 0, r.output[-3000:]
        assert r.value["error"] is not None
    for survivor in (results[0], results[2]):  # every surviving rank names the dead one
        assert "rank(s) [1] never arrived" in survivor.value["error"]
    assert results[0].value["coordination"] and results[2].value["coordination"]
    assert not Path(run_dir, snapshot_dir(2), "commit.json").exists()
    ckpt = moai_ckpt.Checkpointer(run_dir)
    assert ckpt.steps() == [1]
    assert ckpt.verify(1).ok
