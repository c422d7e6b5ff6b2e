"""Training on batches from a source that cannot be indexed, under `fault_tolerant` (a real process).

    python -m tests.scenarios.stream_scenario RUN_DIR TOTAL_STEPS resumable|stream

``resumable``: an iterator whose position snapshots hold (it is tracked). ``stream``: a source
outside the run (a counter file stands for a message queue's committed offset): after a restart
it goes on from where it was, so the logged batches are the only copy of what was consumed.
Prints one JSON line: the final parameter digest, the steps replayed, the batches the source
yielded in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import moai_ckpt
from moai_ckpt.run import Run
from tests.helpers import TinyNet


def make_batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return {"tokens": torch.randint(0, 32, (6, 8), generator=g), "weight": torch.rand(6, generator=g)}


class Resumable:
    """Batch i, i+1, ...; its position is state (snapshotted when tracked)."""

    def __init__(self) -> None:
        self.position = 0
        self.yielded = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.position += 1
        self.yielded += 1
        return make_batch(self.position)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class Stream:
    """An outside source: its position lives in a file, not in the run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.yielded = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        position = 0
        if os.path.exists(self.path):
            with open(self.path) as f:
                position = int(f.read())
        with open(self.path, "w") as f:
            f.write(str(position + 1))
        self.yielded += 1
        return make_batch(position + 1)


@moai_ckpt.fault_tolerant(
    storage="{run_dir}", snapshot_every=4, log_sync=True, async_snapshots=False, snapshot_at_end=False
)
def train(run: Run, run_dir: str, total: int, kind: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    source: Resumable | Stream = Resumable() if kind == "resumable" else Stream(os.path.join(run_dir, "..", "offset"))
    run.track(model=model, optim=opt, **({"data": source} if kind == "resumable" else {}))
    for _ in run.steps(total):
        batch = run.next_batch(source)
        opt.zero_grad()
        logits = model(batch["tokens"])
        per_row = nn.functional.cross_entropy(logits.transpose(1, 2), batch["tokens"], reduction="none").mean(1)
        loss = (per_row * batch["weight"]).mean()
        loss.backward()
        opt.step()
        run.record(loss=loss)
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"digest": digest.hexdigest(), "replayed": run.replayed, "yielded": source.yielded}


if __name__ == "__main__":
    print(json.dumps(train(run_dir=sys.argv[1], total=int(sys.argv[2]), kind=sys.argv[3])))
