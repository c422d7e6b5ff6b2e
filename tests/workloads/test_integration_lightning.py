"""PyTorch Lightning: fits killed with SIGKILL resume bitwise; checkpoints go through moai-ckpt.

The fault-tolerance tests run real ``Trainer.fit`` processes (`tests.scenarios.lightning_scenario`; with
two devices Lightning starts the second DDP rank itself) and SIGKILL every process of the job from
here while it is in the middle of a drawn step. The plugin tests run small fits in this process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning integration needs the lightning package (the dev extra)")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import moai_ckpt
from moai_ckpt.errors import CorruptSnapshotError, UnserializableStateError
from moai_ckpt.integrations.lightning import CheckpointPointer, MoaiCheckpointIO
from moai_ckpt.layout import log_segment_key
from replay.log import LogWriter, history, read_log
from replay.recorder import ReplayDivergenceError
from tests.scenarios import integration_runs as runs
from tests.scenarios import lightning_scenario
from tests.scenarios.lightning_scenario import TOTAL_STEPS

# -- real processes -------------------------------------------------------------------------------

SCENARIO = "tests.scenarios.lightning_scenario"
# steps to kill in that leave at least one logged step after the snapshot a run resumes from (the
# scenario snapshots every 4 steps; the record of step k - 2 is durable once step k starts)
REPLAYING_KILLS = [k for k in range(3, TOTAL_STEPS) if k % 4 in (0, 3)]


def fit(run_dir: Path, out_dir: Path, devices: int) -> None:
    """A fit run to its end."""
    runs.run(SCENARIO, out_dir, str(run_dir), str(out_dir), str(devices))


def fit_killed_at(run_dir: Path, out_dir: Path, devices: int, step: int) -> None:
    """A fit whose every process is SIGKILLed while all its ranks are in the middle of ``step``."""
    runs.run_killed_at(SCENARIO, out_dir, step, devices, str(run_dir), str(out_dir), str(devices))


def result(out_dir: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((out_dir / f"result-{rank}.json").read_text())  # type: ignore[no-any-return]


def losses(out_dir: Path, rank: int = 0) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / f"losses-{rank}.jsonl").read_text().splitlines()]


def check_resumed_bitwise(out: Path, reference: Path, killed_at: int, killed_lines: int, rank: int = 0) -> None:
    """The resumed fit ends bitwise equal to the reference, every step with the reference's loss.

    ``killed_lines``: how many loss lines the killed run wrote (the resumed run's follow them).
    """
    final, ref = result(out, rank), result(reference, rank)
    assert final["tensors"] == ref["tensors"]  # per-tensor sha256 of the module and optimizer state
    assert final["schedulers"] == ref["schedulers"] and final["rng"] == ref["rng"]
    assert final["global_step"] == TOTAL_STEPS
    expected = {line["step"]: line["loss"] for line in losses(reference, rank)}
    seen = losses(out, rank)  # the killed run's steps, then the resumed run's (replayed ones included)
    assert all(line["loss"] == expected[line["step"]] for line in seen)
    assert [line["step"] for line in seen[:killed_lines]] == list(range(1, killed_lines + 1))
    resumed = seen[killed_lines:]
    resumed_at = next(line["step"] for line in resumed if not line["replayed"])
    # a step completes when on_train_batch_end has logged it; the record of killed_at - 1 is durable
    # before killed_at completes (log_lag=1), so it may run again
    assert killed_at - 1 <= resumed_at <= killed_at
    assert [line["step"] for line in resumed] == list(range(final["resumed_from"] + 1, TOTAL_STEPS + 1))
    report = final["report"]
    assert report["steps"] and report["strict"] and all(s["bitwise"] for s in report["steps"])
    assert [s["step"] for s in report["steps"]] == list(range(final["resumed_from"] + 1, resumed_at))


@pytest.fixture(scope="module")
def reference_1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runs.Background]:
    """An uninterrupted one-process fit, started now (tests wait for it when they need it)."""
    out = tmp_path_factory.mktemp("reference-1")
    with runs.Background(SCENARIO, out, str(out / "run"), str(out), "1") as reference:
        yield reference


@pytest.fixture(scope="module")
def reference_2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runs.Background]:
    """An uninterrupted 2-rank DDP fit, started now."""
    out = tmp_path_factory.mktemp("reference-2")
    with runs.Background(SCENARIO, out, str(out / "run"), str(out), "2") as reference:
        yield reference


@pytest.mark.slow
def test_a_fit_killed_mid_epoch_resumes_at_its_last_completed_step_bitwise(
    tmp_path: Path, reference_1: runs.Background
) -> None:
    killed_at = random.Random(17).choice(REPLAYING_KILLS)
    print(f"SIGKILL in the middle of step {killed_at} of {TOTAL_STEPS}")
    fit_killed_at(tmp_path / "run", tmp_path, 1, killed_at)
    killed_lines = len(losses(tmp_path))
    assert killed_lines == killed_at - 1  # every step before the one in progress completed
    fit(tmp_path / "run", tmp_path, 1)
    check_resumed_bitwise(tmp_path, reference_1.wait(), killed_at, killed_lines)


@pytest.fixture(scope="module")
def killed_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 2-rank DDP fit SIGKILLed (both ranks) in the middle of a drawn step: its directory, the step."""
    out = tmp_path_factory.mktemp("killed-ddp")
    killed_at = random.Random(29).choice(REPLAYING_KILLS)
    print(f"SIGKILL of both ranks in the middle of step {killed_at} of {TOTAL_STEPS}")
    fit_killed_at(out / "run", out, 2, killed_at)
    return out, killed_at


@pytest.mark.slow
def test_a_ddp_fit_killed_on_every_rank_resumes_bitwise_on_two_ranks(
    tmp_path: Path, reference_2: runs.Background, killed_ddp: tuple[Path, int]
) -> None:
    killed, killed_at = killed_ddp
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    killed_lines = [len(losses(tmp_path, rank)) for rank in (0, 1)]
    assert killed_lines == [killed_at - 1] * 2
    fit(tmp_path / "run", tmp_path, 2)
    for rank in (0, 1):
        check_resumed_bitwise(tmp_path, reference_2.wait(), killed_at, killed_lines[rank], rank)


@pytest.mark.slow
def test_a_ddp_fit_resumed_on_one_device_keeps_the_global_data_order_and_reports_drift(
    tmp_path: Path, reference_2: runs.Background, killed_ddp: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    killed, _ = killed_ddp
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    with caplog.at_level(logging.INFO, logger="moai_ckpt.integrations"):
        lightning_scenario.train(str(tmp_path / "run"), str(tmp_path), 1)  # in this process, on one device
    report = result(tmp_path)["report"]
    assert not report["strict"] and report["placement_changes"] == ["world_size: 2 -> 1"]
    assert report["steps"] and all("samples" not in s["mismatches"] for s in report["steps"])  # same batches
    assert "largest drift" in caplog.text
    assert moai_ckpt.Checkpointer(str(tmp_path / "run")).storage.list("reports")
    # every step of the run, before and after the move to one device, trained on the reference's samples
    resumed = history(moai_ckpt.Checkpointer(str(tmp_path / "run")).storage)
    original = history(moai_ckpt.Checkpointer(str(reference_2.wait() / "run")).storage)
    assert sorted(resumed) == sorted(original) == list(range(1, TOTAL_STEPS + 1))
    assert all(resumed[s].samples == original[s].samples for s in original)


@pytest.mark.slow
def test_a_replayed_step_that_differs_from_its_log_record_is_an_error_naming_it(
    tmp_path: Path, reference_1: runs.Background
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference_1.wait() / "run", run)
    ckpt = moai_ckpt.Checkpointer(str(run))
    last = ckpt.latest_step()
    assert last == TOTAL_STEPS
    ckpt.storage.delete([f"snapshots/{last:012d}/commit.json"])  # as if killed before the last snapshot committed
    base = ckpt.latest_step()
    assert base is not None
    contents = read_log(ckpt.storage, base)
    record = contents.records[0]
    tampered = record.model_copy(update={"digests": record.digests.model_copy(update={"loss": 1.5})})
    ckpt.storage.delete([log_segment_key(base, record.step, record.step)])
    LogWriter(ckpt.storage, base).copy([tampered], contents)  # the same record with its loss changed
    with pytest.raises(ReplayDivergenceError, match=f"step {record.step}: first divergent quantity loss"):
        lightning_scenario.train(str(run), str(tmp_path), 1)  # in this process


@pytest.mark.slow
def test_a_finished_fit_started_again_trains_nothing_and_ends_in_the_same_state(
    tmp_path: Path, reference_1: runs.Background
) -> None:
    reference = reference_1.wait()
    shutil.copytree(reference / "run", tmp_path / "run")
    lightning_scenario.train(str(tmp_path / "run"), str(tmp_path), 1)  # in this process
    assert not (tmp_path / "losses-0.jsonl").exists()  # no step ran
    final, ref = result(tmp_path), result(reference)
    assert final["resumed_from"] == TOTAL_STEPS
    assert (final["tensors"], final["schedulers"], final["rng"]) == (ref["tensors"], ref["schedulers"], ref["rng"])


# -- MoaiCheckpointIO, in this process ------------------------------------------------------------


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 8, settings: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def trainer(plugin: Any, tmp_path: Path, epochs: int, **checkpointing: Any) -> pl.Trainer:
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpts", **checkpointing)] if checkpointing else []
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        plugins=[plugin],
        callbacks=callbacks,
        enable_checkpointing=bool(checkpointing),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def test_a_checkpoint_round_trips_through_a_snapshot_and_its_pointer_file(tmp_path: Path) -> None:
    plugin = MoaiCheckpointIO(str(tmp_path / "store"))
    t = trainer(plugin, tmp_path, 1)
    t.fit(Regressor(), loader())
    saved = t._checkpoint_connector.dump_checkpoint()
    path = tmp_path / "ckpts" / "epoch=0-step=8.ckpt"
    plugin.save_checkpoint(saved, path)
    pointer = CheckpointPointer.model_validate_json(path.read_text())
    snapshots = moai_ckpt.Checkpointer(str(tmp_path / "store" / "checkpoints" / pointer.run))
    assert snapshots.steps() == [8] == [pointer.step] and snapshots.verify(8).ok
    assert_same_tree(saved, plugin.load_checkpoint(path))


def test_a_fit_resumes_from_a_checkpoint_the_plugin_saved(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    straight = Regressor()
    trainer(MoaiCheckpointIO(str(tmp_path / "a")), tmp_path / "a", 4).fit(straight, loader())

    pl.seed_everything(0, verbose=False)
    plugin = MoaiCheckpointIO(str(tmp_path / "b"))
    first = trainer(plugin, tmp_path / "b", 2, every_n_epochs=1, save_top_k=1, monitor="train_loss", save_last=True)
    first.fit(Regressor(), loader())
    names = sorted(p.name for p in (tmp_path / "b" / "ckpts").iterdir())
    assert "last.ckpt" in names and len(names) == 2  # the best and the last checkpoint, as pointer files
    runs = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert len(runs) == 2  # top-k removals deleted the other snapshots' run directories

    pl.seed_everything(1, verbose=False)  # another initialisation: the checkpoint must overwrite it
    resumed = Regressor()
    trainer(MoaiCheckpointIO(str(tmp_path / "b")), tmp_path / "b", 4).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "b" / "ckpts" / "last.ckpt")
    )
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("how", ["async_save", "AsyncCheckpointIO"])
def test_asynchronous_saves_leave_a_committed_snapshot_behind_every_pointer(tmp_path: Path, how: str) -> None:
    base = MoaiCheckpointIO(str(tmp_path / "store"), async_save=how == "async_save")
    plugin = base if how == "async_save" else AsyncCheckpointIO(base)
    t = trainer(plugin, tmp_path, 3, every_n_epochs=1, save_top_k=-1)
    t.fit(Regressor(), loader())
    pointers = sorted((tmp_path / "ckpts").iterdir())
    assert len(pointers) == 3
    for path in pointers:
        pointer = CheckpointPointer.model_validate_json(path.read_text())
        run = moai_ckpt.Checkpointer(str(tmp_path / "store" / "checkpoints" / pointer.run))
        assert run.steps() == [pointer.step] and run.verify(pointer.step).ok
        assert base.load_checkpoint(path)["global_step"] == pointer.step


class Settings:
    """A hyperparameter that is neither a tensor nor JSON-able."""


def test_an_unserializable_hyperparameter_is_refused_by_name_or_dropped_on_request(tmp_path: Path) -> None:
    plugin = MoaiCheckpointIO(str(tmp_path / "store"))
    t = trainer(plugin, tmp_path, 1)
    t.fit(Regressor(settings=Settings()), loader())
    path = tmp_path / "ckpts" / "model.ckpt"
    with pytest.raises(UnserializableStateError, match=r"hyper_parameters\.settings") as raised:
        t.save_checkpoint(path)
    assert "unserializable='drop'" in str(raised.value)
    assert not path.exists() and not (tmp_path / "store" / "checkpoints").exists()  # nothing committed

    t.strategy.checkpoint_io = MoaiCheckpointIO(str(tmp_path / "store"), unserializable="drop")
    with pytest.warns(UserWarning, match=r"leaves out hyper_parameters\.settings"):
        t.save_checkpoint(path)
    loaded = t.strategy.checkpoint_io.load_checkpoint(path)
    assert loaded["hyper_parameters"] == {"width": 8}


def test_a_pickled_checkpoint_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "torch.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CorruptSnapshotError, match="not a moai-ckpt checkpoint pointer"):
        MoaiCheckpointIO(str(tmp_path / "store")).load_checkpoint(path)


@pytest.mark.parametrize("how", ["link", "copy"])
def test_removing_a_link_or_copy_of_a_checkpoint_keeps_the_checkpoint_it_points_at(tmp_path: Path, how: str) -> None:
    plugin = MoaiCheckpointIO(str(tmp_path / "store"))
    target, last = tmp_path / "epoch=0-step=3.ckpt", tmp_path / "last.ckpt"
    plugin.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.arange(4.0)}}, target)
    if how == "link":  # as ModelCheckpoint(save_last="link") makes it; a copy where links are not allowed
        os.symlink(target.name, last)
    else:
        shutil.copy(target, last)
    plugin.remove_checkpoint(last)
    assert not last.exists() and not last.is_symlink()
    assert torch.equal(plugin.load_checkpoint(target)["state_dict"]["w"], torch.arange(4.0))
    plugin.remove_checkpoint(target)
    assert not target.exists() and not list((tmp_path / "store" / "checkpoints").iterdir())
