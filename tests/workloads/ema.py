"""Regression with an exponential moving average of the weights (torch.optim.swa_utils).

The EMA copy averages the BatchNorm buffers too (``use_buffers=True``) and is the model we
evaluate every few steps.

    python ema.py --run-dir runs/ema --steps 30
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from zoo_result import finish, report_step, rng_state

import moai_ckpt


def make_data(n=768):
    g = torch.Generator().manual_seed(21)
    x = torch.rand(n, 8, generator=g) * 4 - 2
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=7)
def train(run, run_dir, steps=30, out=None):
    torch.manual_seed(3)
    x, y = make_data()
    model = nn.Sequential(
        nn.Linear(8, 64), nn.BatchNorm1d(64), nn.SiLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1)
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.97)
    run.track(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler)
    sampler = run.sampler(len(x), 48, seed=4)
    val_losses = {}

    for step in run.steps(steps):
        idx = run.batch()
        model.train()
        loss = F.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)
        run.record(loss=loss)
        report_step(step, loss)
        if step % 10 == 0:
            ema.eval()
            with torch.no_grad():
                val_losses[step] = F.mse_loss(ema(x[:128]), y[:128]).item()
            if not run.replaying:
                print(f"step {step}: ema val loss {val_losses[step]:.4f}", flush=True)

    finish(
        out,
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": sampler.state_dict(),
            "rng": rng_state(("torch",)),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    train(run_dir=args.run_dir, steps=args.steps, out=args.out)
