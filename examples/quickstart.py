"""Train, snapshot, restore into freshly built objects, and show the run continuing identically.

    python examples/quickstart.py --dir runs/quickstart

Two runs of the same small language model share the first half: the "uninterrupted" run trains
straight through; the "resumed" run is rebuilt from scratch (new model, optimizer, scheduler, grad
scaler, data generator, scrambled global RNGs), restored from the snapshot, and trains the second
half. The table compares their losses step by step and the final parameter digests.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import moai_ckpt

VOCAB, CONTEXT, DIM = 64, 32, 64
CORPUS = (
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun "
    "and the bird sings a song of spring to the quiet hills beyond the river "
) * 40


class TinyLM(nn.Module):
    """A two-layer transformer language model over bytes, with tied embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(CONTEXT, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=4 * DIM, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(self.embed(tokens) + self.pos, mask=mask, is_causal=True))


class Run:
    """Everything the training loop touches."""

    def __init__(self, seed: int, steps: int) -> None:
        torch.manual_seed(seed)
        self.model = TinyLM()
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.optim, max_lr=3e-3, total_steps=steps)
        self.scaler = torch.amp.GradScaler("cpu")
        self.data = torch.Generator().manual_seed(seed + 1)
        self.tokens = torch.tensor([b % VOCAB for b in CORPUS.encode()])

    def state(self, extra: dict) -> dict:
        return {
            "model": self.model,
            "optim": self.optim,
            "sched": self.sched,
            "scaler": self.scaler,
            "data": self.data,
            "extra": extra,
        }

    def step(self) -> float:
        starts = torch.randint(0, len(self.tokens) - CONTEXT - 1, (8,), generator=self.data)
        batch = torch.stack([self.tokens[s : s + CONTEXT + 1] for s in starts.tolist()])
        self.optim.zero_grad(set_to_none=True)
        logits = self.model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optim)
        self.scaler.update()
        self.sched.step()
        return float(loss.detach())

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="runs/quickstart", help="run directory (any fsspec URL works)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    console = Console()
    shutil.rmtree(args.dir, ignore_errors=True)
    torch.set_num_threads(1)
    half = args.steps // 2

    console.rule("uninterrupted run")
    run = Run(seed=0, steps=args.steps)
    moai_ckpt.register_generator("data", run.data)
    losses = [run.step() for _ in range(half)]
    ckpt = moai_ckpt.Checkpointer(args.dir)
    t = time.perf_counter()
    ckpt.save(half, run.state({"tokens_seen": half * 8 * CONTEXT}))
    console.print(f"snapshot of step {half} committed to {args.dir} in {time.perf_counter() - t:.2f} s")
    losses += [run.step() for _ in range(args.steps - half)]

    console.rule("resumed run: fresh objects, scrambled RNGs, restore, continue")
    resumed = Run(seed=123, steps=args.steps)
    moai_ckpt.register_generator("data", resumed.data)
    random.seed(99)
    np.random.seed(99)
    extra: dict = {}
    step = ckpt.restore(resumed.state(extra))
    console.print(f"restored step {step} (extras: {extra}); verify: {'ok' if ckpt.verify(step).ok else 'FAULTS'}")
    resumed_losses = losses[:half] + [resumed.step() for _ in range(args.steps - half)]

    table = Table(title="uninterrupted vs resumed")
    table.add_column("step", justify="right")
    table.add_column("uninterrupted loss", justify="right")
    table.add_column("resumed loss", justify="right")
    table.add_column("equal")
    for i in range(half - 2, args.steps):
        same = losses[i] == resumed_losses[i]
        table.add_row(str(i + 1), f"{losses[i]:.6f}", f"{resumed_losses[i]:.6f}", "yes" if same else "NO")
    console.print(table)
    digests = (run.digest(), resumed.digest())
    console.print(f"final parameter digest: uninterrupted {digests[0]}, resumed {digests[1]}")
    identical = digests[0] == digests[1] and losses == resumed_losses
    console.print("[bold green]bitwise identical[/]" if identical else "[bold red]runs differ[/]")
    raise SystemExit(0 if identical else 1)


if __name__ == "__main__":
    main()
