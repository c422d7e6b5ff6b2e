"""Per-rank programs for the multi-process tests (run by moai_ckpt.testing.dist.launch)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import moai_ckpt
from moai_ckpt.sampler import GlobalSampler

SAMPLES, BATCH = 64, 16


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model() -> nn.Module:
    """Row counts 10, 7, 5 and 3 shard unevenly over 2, 3 and 4 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.LayerNorm(7), nn.Linear(7, 5), nn.Linear(5, 3)
    )


def device() -> torch.device:
    if os.environ.get("MOAI_TEST_BACKEND") == "nccl" or os.environ.get("MOAI_TEST_DEVICE") == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap(model: nn.Module, mode: str) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the module whose state is saved/restored)."""
    model = model.to(device())
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        return model, model
    if mode == "ddp":
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device().index] if device().type == "cuda" else None
        )
        return ddp, model
    return model, model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(SAMPLES, 6, generator=g), torch.randn(SAMPLES, 3, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, sampler: GlobalSampler, steps: int) -> None:
    rank, world = rank_and_world()
    x, y = (t.to(device()) for t in data())
    for _ in range(steps):
        idx = sampler.next_batch(rank, world)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """Every parameter and optimizer state tensor, gathered whole (a collective under FSDP)."""

    def whole(t: torch.Tensor) -> np.ndarray:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        return t.detach().cpu().numpy().copy()

    out = {}
    for name, p in model.named_parameters():
        out[f"model.{name}"] = whole(p)
        for key, value in sorted(opt.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                out[f"optim.{name}.{key}"] = whole(value)
    return out


def save(
    run_dir: str, ref_path: str, mode: str, steps: int = 2, chunk_bytes: int = 64, persist: str = "sync"
) -> dict[str, Any]:
    """Train and save; ``persist`` "process" saves with save_async through each rank's writer process."""
    rank, _ = rank_and_world()
    trained, saved = wrap(build_model(), mode)
    opt = torch.optim.AdamW(saved.parameters(), lr=1e-2)
    sampler = GlobalSampler(SAMPLES, BATCH, seed=1)
    train(trained, opt, sampler, steps)
    ckpt = moai_ckpt.Checkpointer(
        run_dir, chunk_bytes=chunk_bytes, collective_timeout_s=120, persist="thread" if persist == "sync" else persist
    )
    written = [0]
    state = {"model": saved, "optim": opt, "data": sampler}
    full = full_state(saved, opt)

    def count(n: int) -> None:
        written[0] += n

    path = "sync"
    if persist == "sync":
        marker = ckpt.save(steps, state, progress=count)
    else:
        assert ckpt.start_writer(wait=120), "the writer process did not come up"
        handle = ckpt.save_async(steps, state, progress=count)
        assert handle is not None
        train(trained, opt, sampler, 1)  # training goes on while the writer process persists
        marker, path = handle.result(timeout=120), handle.persist
        ckpt.close()  # ends the writer process
    if rank == 0:
        np.savez(ref_path, **full)
    return {"rank": rank, "bytes_written": written[0], "world_size": marker.body.world_size, "persist": path}


def restore(run_dir: str, ref_path: str, mode: str, train_after: int = 0) -> dict[str, Any]:
    rank, _ = rank_and_world()
    _, target = wrap(build_model(), mode)
    opt = torch.optim.AdamW(target.parameters(), lr=1e-2)
    sampler = GlobalSampler(SAMPLES, BATCH, seed=1)
    ckpt = moai_ckpt.Checkpointer(run_dir, collective_timeout_s=60)
    read = [0]
    step = ckpt.restore(
        {"model": target, "optim": opt, "data": sampler}, progress=lambda n: read.__setitem__(0, read[0] + n)
    )
    full = full_state(target, opt)
    with np.load(ref_path, allow_pickle=False) as ref:
        expected = {k: ref[k] for k in ref.files}
    mismatches = sorted(k for k in expected if k not in full or not np.array_equal(expected[k], full[k]))
    extra = sorted(set(full) - set(expected))
    return {
        "rank": rank,
        "step": step,
        "mismatches": mismatches,
        "extra": extra,
        "compared": len(expected),
        "bytes_read": read[0],
        "sampler": sampler.state_dict(),
        "next_batch": sampler.global_batch(),
    }


def save_with_dying_rank(run_dir: str, victim: int) -> dict[str, Any]:
    rank, _ = rank_and_world()
    _, model = wrap(build_model(), "fsdp")
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=64, collective_timeout_s=15)
    ckpt.save(1, {"model": model})  # one good snapshot first
    if rank == victim:
        from moai_ckpt import snapshot_writer

        def die(*args: Any, **kwargs: Any) -> None:
            os._exit(17)  # killed in the middle of writing its chunks

        snapshot_writer.SnapshotWriter._write_chunk = die  # type: ignore[method-assign]
    try:
        ckpt.save(2, {"model": model})
    except moai_ckpt.MoaiCkptError as exc:
        return {
            "rank": rank,
            "error": f"{type(exc).__name__}: {exc}",
            "coordination": isinstance(exc, moai_ckpt.CoordinationError),
        }
    return {"rank": rank, "error": None}


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=4, snapshot_at_end=False, collective_timeout_s=20)
def ft_train(run: moai_ckpt.Run, run_dir: str, total: int) -> dict[str, Any]:
    """FSDP2 training under `fault_tolerant` (a plain module on one rank); faults from the environment."""
    import hashlib

    _, world = rank_and_world()
    trained, model = wrap(build_model(), "fsdp" if world > 1 else "plain")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run.track(model=model, optim=opt)
    run.sampler(SAMPLES, BATCH, seed=1)
    x, y = (t.to(device()) for t in data())
    first_step, losses, samples = None, {}, {}
    for step in run.steps(total):
        first_step = step if first_step is None else first_step
        idx = run.batch()
        loss = nn.functional.mse_loss(trained(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.record(loss=loss)
        if not run.replaying:
            losses[step] = float(loss.detach())
            samples[step] = idx
    digest = hashlib.sha256()
    for value in full_state(model, opt).values():
        digest.update(value.tobytes())
    report = run.report
    return {
        "digest": digest.hexdigest(),
        "first_step": first_step,
        "replayed": run.replayed,
        "last_step": run.step,
        "losses": losses,
        "samples": samples,
        "placement_changes": report.placement_changes if report is not None else [],
        "max_drift": report.max_drift() if report is not None else {},
    }


def fault_tolerant_train(run_dir: str, total: int) -> dict[str, Any]:
    rank, _ = rank_and_world()
    try:
        return {"rank": rank, **ft_train(run_dir=run_dir, total=total)}
    except moai_ckpt.MoaiCkptError as exc:
        return {"rank": rank, "error": f"{type(exc).__name__}: {exc}"}
