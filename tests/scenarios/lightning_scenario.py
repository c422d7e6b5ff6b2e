"""A small Lightning fit under `MoaiFaultTolerance` (a real process, killed from the test).

    python -m tests.scenarios.lightning_scenario RUN_DIR OUT_DIR DEVICES

`train` runs the same fit in the calling process. ``DEVICES`` > 1 runs DDP on CPU (gloo); Lightning starts the other ranks itself. With
``MOAI_TEST_PAUSE_AT=K`` every rank writes ``OUT_DIR/paused-<rank>`` in the middle of step K
(after the forward, before the backward) and waits there to be killed. Each rank appends
``{"step", "loss", "replayed"}`` lines to ``OUT_DIR/losses-<rank>.jsonl`` as steps complete, and
writes ``OUT_DIR/result-<rank>.json`` at the end: the sha256 of every tensor of the final state
(module, optimizer), the schedulers' states, the RNG state and the replay report.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moai_ckpt.integrations.lightning import MoaiFaultTolerance

SAMPLES, GLOBAL_BATCH, EPOCHS = 48, 8, 3  # 6 steps an epoch, 18 in all
TOTAL_STEPS = SAMPLES // GLOBAL_BATCH * EPOCHS


class TinyRegressor(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        step = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if os.environ.get("MOAI_TEST_PAUSE_AT") == str(step):
            with open(os.path.join(self.out_dir, f"paused-{self.global_rank}"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # the test kills every rank here
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=2e-2, weight_decay=0.01)
        per_step = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        per_epoch = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        return [opt], [{"scheduler": per_step, "interval": "step"}, {"scheduler": per_epoch, "interval": "epoch"}]


class LossFile(pl.Callback):
    """Appends every completed step's loss, as it completes (a killed run keeps what it wrote)."""

    def __init__(self, ft: MoaiFaultTolerance, out_dir: str) -> None:
        self.ft = ft
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        line = {"step": trainer.global_step, "loss": float(outputs["loss"]), "replayed": self.ft.replaying}
        with open(os.path.join(self.out_dir, f"losses-{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def final_state(trainer: pl.Trainer, model: TinyRegressor) -> dict[str, Any]:
    tensors = {f"model.{k}": sha(v) for k, v in model.state_dict().items()}
    for pid, state in trainer.optimizers[0].state_dict()["state"].items():
        tensors.update({f"optim.{pid}.{k}": sha(v) for k, v in state.items() if isinstance(v, torch.Tensor)})
    schedulers = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
    return {"tensors": tensors, "schedulers": schedulers, "rng": sha(torch.get_rng_state())}


def train(run_dir: str, out_dir: str, devices: int) -> None:
    """The fit (in this process, or as the first of ``devices`` DDP ranks)."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 6, generator=generator)
    dataset = TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(SAMPLES, 1, generator=generator))
    ft = MoaiFaultTolerance(run_dir, snapshot_every=4)
    loader = DataLoader(dataset, batch_sampler=ft.batch_sampler(SAMPLES, GLOBAL_BATCH, seed=3))
    model = TinyRegressor(out_dir)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,
        callbacks=[ft, LossFile(ft, out_dir)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    report = ft.report
    result = {
        **final_state(trainer, model),
        "global_step": trainer.global_step,
        "resumed_from": ft.resumed_from,
        "report": report.model_dump(mode="json") if report is not None else None,
    }
    with open(os.path.join(out_dir, f"result-{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]))


if __name__ == "__main__":
    main()
