"""A torch.compile'd model: a tiny character-level MLP language model, compiled with inductor.

python compiled.py --run-dir runs/compiled --steps 30
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo_result import finish, report_step, rng_state

import moai_ckpt

CONTEXT = 8
VOCAB = 40


class CharMLP(nn.Module):
    def __init__(self, emb=16, hidden=64):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb)
        self.net = nn.Sequential(
            nn.Linear(CONTEXT * emb, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, VOCAB)
        )

    def forward(self, x):
        return self.net(self.emb(x).flatten(1))


def make_windows(n=2000):
    g = torch.Generator().manual_seed(17)
    text = torch.randint(0, VOCAB, (n + CONTEXT,), generator=g)
    text[1::3] = (text[0:-1:3] * 7 + 3) % VOCAB  # a learnable pattern
    windows = text.unfold(0, CONTEXT + 1, 1)[:n]
    return windows[:, :CONTEXT].contiguous(), windows[:, CONTEXT].contiguous()


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=7)
def train(run, run_dir, steps=30, out=None):
    torch.manual_seed(9)
    x, y = make_windows()
    model = torch.compile(CharMLP())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    run.track(model=model, optimizer=optimizer)
    sampler = run.sampler(len(x), 64, seed=5)

    model.train()
    for step in run.steps(steps):
        idx = run.batch()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.record(loss=loss)
        report_step(step, loss)

    finish(
        out,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
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
