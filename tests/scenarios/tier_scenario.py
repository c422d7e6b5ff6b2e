"""A small training run with a local snapshot tier (run as a real process, stopped by a fault point).

    python -m tests.scenarios.tier_scenario RUN_DIR LOCAL_TIER TOTAL_STEPS

Snapshots go to the persistent tier every 10 steps and to the local tier every 2, synchronously,
with each step's record durable before the next step starts, so which snapshots exist when a
fault stops the process is fixed by the step alone. An empty LOCAL_TIER runs without one. Faults
come from ``MOAI_CKPT_FAULTS``. Prints one JSON line: the final parameter digest, the steps
replayed, the first step run and the restart's report.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import torch
from torch import nn

import moai_ckpt
from moai_ckpt.run import Run
from tests.helpers import TinyNet


def train(run: Run, run_dir: str, total: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    first_step = None
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run.track(model=model, optim=opt)
    run.sampler(64, 8, seed=3)
    tokens = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(7))
    for step in run.steps(total):
        first_step = step if first_step is None else first_step
        batch = tokens[run.batch()]
        opt.zero_grad()
        logits = nn.functional.dropout(model(batch), p=0.1)  # the RNG matters
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), batch.reshape(-1))
        loss.backward()
        opt.step()
        run.record(loss=loss)
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    report = run.report.model_dump(mode="json") if run.report is not None else None
    return {"digest": digest.hexdigest(), "first_step": first_step, "replayed": run.replayed, "report": report}


def _options(local_tier: str) -> dict[str, Any]:
    tier = {"local_tier": local_tier, "local_every": 2} if local_tier else {}
    return {"snapshot_every": 10, "async_snapshots": False, "log_sync": True, "snapshot_at_end": False, **tier}


def dist_train(run_dir: str, local_tier: str, total: int) -> dict[str, Any]:
    """The same schedule on every rank of a gloo group, a DDP model (run by `moai_ckpt.testing.dist.launch`)."""
    from tests.scenarios.dist_scenarios import BATCH, SAMPLES, build_model, data, full_state, rank_and_world, wrap

    def ddp_train(run: Run, run_dir: str, total: int) -> dict[str, Any]:
        trained, model = wrap(build_model(), "ddp")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run.track(model=model, optim=opt)
        run.sampler(SAMPLES, BATCH, seed=1)
        x, y = data()
        first_step = None
        for step in run.steps(total):
            first_step = step if first_step is None else first_step
            idx = run.batch()
            loss = nn.functional.mse_loss(trained(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.record(loss=loss)
        digest = hashlib.sha256()
        for value in full_state(model, opt).values():
            digest.update(value.tobytes())
        report = run.report.model_dump(mode="json") if run.report is not None else None
        return {"digest": digest.hexdigest(), "first_step": first_step, "replayed": run.replayed, "report": report}

    wrapped = moai_ckpt.fault_tolerant(storage="{run_dir}", collective_timeout_s=20, **_options(local_tier))(ddp_train)
    return {"rank": rank_and_world()[0], **wrapped(run_dir=run_dir, total=total)}


def main() -> None:
    run_dir, local_tier, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wrapped = moai_ckpt.fault_tolerant(storage="{run_dir}", **_options(local_tier))(train)
    print(json.dumps(wrapped(run_dir=run_dir, total=total)))


if __name__ == "__main__":
    main()
