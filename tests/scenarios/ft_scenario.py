"""A small training run under `fault_tolerant` (run as a real process, killed by fault points).

    python -m tests.scenarios.ft_scenario RUN_DIR TOTAL_STEPS

Faults come from ``MOAI_CKPT_FAULTS`` (see `moai_ckpt.faults`); ``MOAI_TEST_LOG_SYNC=1`` makes each
record durable before the next step starts. Prints one JSON line: the final parameter digest, the
steps replayed and the losses of the steps run live.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import torch
from torch import nn

import moai_ckpt
from moai_ckpt.run import Run
from tests.helpers import TinyNet


@moai_ckpt.fault_tolerant(
    storage="{run_dir}",
    snapshot_every=4,
    log_sync=os.environ.get("MOAI_TEST_LOG_SYNC") == "1",
    snapshot_at_end=False,  # the tests look at the log after the last periodic snapshot
)
def train(run: Run, run_dir: str, total: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    losses: dict[int, float] = {}
    first_step = None
    device = torch.device(os.environ.get("MOAI_TEST_DEVICE", "cpu"))
    model = TinyNet().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    run.track(model=model, optim=opt, sched=sched)
    run.sampler(64, 8, seed=3)
    tokens = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(7)).to(device)
    for step in run.steps(total):
        first_step = step if first_step is None else first_step
        batch = tokens[run.batch()]
        opt.zero_grad()
        logits = nn.functional.dropout(model(batch), p=0.1)  # the RNG (CPU or CUDA) matters
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), batch.reshape(-1))
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run.record(loss=loss, grad_norm=grad_norm)
        if not run.replaying:
            losses[step] = float(loss.detach())
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"digest": digest.hexdigest(), "losses": losses, "first_step": first_step, "replayed": run.replayed}


def main() -> None:
    result = train(run_dir=sys.argv[1], total=int(sys.argv[2]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
