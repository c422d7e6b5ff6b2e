"""A small training run under `fault_tolerant`, killed on request (run as a real process).

    python -m tests.ft_scenario RUN_DIR TOTAL_STEPS [DIE_AT_STEP PHASE]

Prints one JSON line: the final parameter digest, the steps replayed and the losses of live steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch
from torch import nn

import moai_ckpt
from moai_ckpt.run import Run
from tests.helpers import TinyNet


def die(step: int, phase: str, at: int | None, wanted: str | None, run: Run) -> None:
    if at == step and not run.replaying:
        if wanted == phase:
            os.kill(os.getpid(), signal.SIGKILL)
        elif wanted == f"sigterm-{phase}":
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting the job would


def main() -> None:
    run_dir, total = sys.argv[1], int(sys.argv[2])
    die_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    phase = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    losses: dict[int, float] = {}
    info: dict[str, int] = {}

    @moai_ckpt.fault_tolerant(storage=run_dir, snapshot_every=4)
    def train(run: Run) -> str:
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run.track(model=model, optim=opt)
        run.sampler(64, 8, seed=3)
        tokens = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(7))
        for step in run.steps(total):
            info.setdefault("first_step", step)
            batch = tokens[run.batch()]
            die(step, "forward", die_at, phase, run)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(batch).reshape(-1, 32), batch.reshape(-1))
            loss.backward()
            die(step, "backward", die_at, phase, run)
            opt.step()
            die(step, "optimizer", die_at, phase, run)
            run.record(loss=loss)
            if not run.replaying:
                losses[step] = float(loss.detach())
            die(step, "after", die_at, phase, run)
        info["replayed"] = run.replayed
        digest = hashlib.sha256()
        for t in model.state_dict().values():
            digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    digest = train()
    print(json.dumps({"digest": digest, "losses": losses, **info}))


if __name__ == "__main__":
    main()
