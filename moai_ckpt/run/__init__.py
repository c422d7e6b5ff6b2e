"""The fault-tolerant run: `fault_tolerant`, `Run` and `RunOptions`, and the rooms a run is built of.

- `handle`: `Run`, the handle a training loop holds;
- `options`: `RunOptions`, every setting, from code, ``MOAI_CKPT_*`` variables or a file;
- `decorator`: `fault_tolerant`;
- `session`: live runs and the CLI's offline sessions (`RunMode`);
- `resume`: restore the newest usable snapshot, open the log after it;
- `step`: the begin and the end of each step;
- `snapshots`: when to snapshot (policies) and taking snapshots;
- `tracked`: what snapshots hold;
- `report`: the end of a replay;
- `hooks`: what placement and op capture may see of a run;
- `worker`: one process of a re-run training function.
"""

from __future__ import annotations

from moai_ckpt.errors import ReplayDivergenceError
from moai_ckpt.run.decorator import fault_tolerant
from moai_ckpt.run.handle import Run
from moai_ckpt.run.options import RunOptions
from moai_ckpt.run.resume import current_placement, placement_changes, quarantine

__all__ = [
    "ReplayDivergenceError",
    "Run",
    "RunOptions",
    "current_placement",
    "fault_tolerant",
    "placement_changes",
    "quarantine",
]
