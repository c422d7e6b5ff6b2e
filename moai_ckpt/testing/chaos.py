"""A pytest plugin: the ``chaos`` fixture, for chaos tests of your own training job in a few lines.

moai-ckpt registers it (entry point ``pytest11``), so once moai-ckpt is installed any test can ask
for it::

    def test_my_training_survives_kills_and_bit_rot(chaos):
        report = chaos.run("mypkg.train:train", kwargs={"steps": 30}, faults=["kill", "corrupt_chunk"])
        report.assert_ok()

The training function must be `moai_ckpt.fault_tolerant` and take its run directory as the keyword
argument ``storage`` (``storage_kwarg=`` names another). Each call runs a fault-free reference and
the faulty run under torchrun, in the test's temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from moai_ckpt.tools.chaos import TrialReport


class ChaosHarness:
    """What the ``chaos`` fixture gives a test."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def run(
        self,
        entrypoint: str | None = None,
        *,
        faults: Iterable[str | Mapping[str, Any]] = ("kill",),
        kwargs: Mapping[str, Any] | None = None,
        ranks: int = 2,
        steps: int | None = None,
        seed: int = 0,
        **fields: Any,
    ) -> TrialReport:
        """One trial: ``faults`` (kinds, or dicts of `moai_ckpt.tools.chaos.Fault` fields) on a seeded schedule.

        Args:
            entrypoint: ``module:function`` or ``file.py:function``; the bundled demo by default.
            faults: what to inject; unset steps, ranks and phases are drawn from ``seed``.
            kwargs: the function's JSON keyword arguments (``steps`` among them, if it takes one).
            ranks: torchrun worker processes.
            steps: the steps the job trains (default: ``kwargs["steps"]``, else 30).
            seed: the trial's seed.
            **fields: any other `moai_ckpt.tools.chaos.Scenario` field (``tolerance``, ``hang_timeout_s``...).
        """
        from moai_ckpt.tools.chaos import Fault, Scenario, run_trial

        call = dict(kwargs or {})
        total = steps or int(call.get("steps", 30))
        if "steps" in call or entrypoint is None:
            call["steps"] = total
        if entrypoint is None:
            call.setdefault("batch_size", 16)
        fields = {
            "name": f"test-seed{seed}",
            "kwargs": call,
            "steps": total,
            "ranks": ranks,
            "faults": [Fault(kind=f) if isinstance(f, str) else Fault(**f) for f in faults],  # type: ignore[arg-type]
            **({"entrypoint": entrypoint} if entrypoint else {}),
            **fields,
        }
        scenario = Scenario.model_validate(fields)
        return run_trial(scenario, self.out_dir, seed, quiet=True)


@pytest.fixture
def chaos(tmp_path: Path) -> ChaosHarness:
    """Run training jobs with faults and check they end as the fault-free run does."""
    return ChaosHarness(tmp_path / "chaos")
