"""Mixed precision on CPU: bf16 autocast with a GradScaler, on a small residual MLP classifier.

python bf16_autocast.py --run-dir runs/amp --steps 30
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo_result import finish, report_step, rng_state

import moai_ckpt


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class Classifier(nn.Module):
    def __init__(self, features=20, dim=32, classes=5, depth=3):
        super().__init__()
        self.inp = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def make_data(n=1024):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 5, generator=g)
    return x, (x @ w + 0.5 * torch.randn(n, 5, generator=g)).argmax(1)


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=6)
def train(run, run_dir, steps=30, out=None):
    torch.manual_seed(5)
    x, y = make_data()
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=4)
    run.track(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    sampler = run.sampler(len(x), 32, seed=2)

    for step in run.steps(steps):
        idx = run.batch()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        run.record(loss=loss, grad_norm=grad_norm)
        report_step(step, loss)

    finish(
        out,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
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
