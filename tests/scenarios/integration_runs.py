"""Training scenarios as real processes, for the integration tests: run, run in the background, kill.

A scenario module (`tests.scenarios.lightning_scenario`, `tests.scenarios.hf_scenario`) takes its output directory as
an argument; with ``MOAI_TEST_PAUSE_AT=K`` each of its processes writes ``paused-*`` there in the
middle of step K and waits to be killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300


def env(pause_at: int | None = None) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out.pop("MOAI_TEST_PAUSE_AT", None)
    if pause_at is not None:
        out["MOAI_TEST_PAUSE_AT"] = str(pause_at)
    return out


class Background:
    """A scenario run started now and waited for later (references run while a test kills another)."""

    def __init__(self, module: str, out_dir: Path, *args: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.log_path = out_dir / "run.log"
        cmd = [sys.executable, "-m", module, *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        """A run nobody waited for (its tests were deselected or failed) is stopped."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)

    def wait(self) -> Path:
        """Wait for the run to succeed; returns its output directory."""
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert code == 0, self.log_path.read_text()[-4000:]
        return self.out_dir


def run(module: str, out_dir: Path, *args: str) -> Path:
    """A scenario run to its end."""
    return Background(module, out_dir, *args).wait()


def run_killed_at(module: str, out_dir: Path, step: int, processes: int, *args: str) -> None:
    """A run whose every process is SIGKILLed once all ``processes`` are in the middle of ``step``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, *args]
    with open(out_dir / "killed.log", "w") as log:
        # its own process group: a framework's other ranks are children of the first, all die at once
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(step), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + TIMEOUT_S
        while len(list(out_dir.glob("paused*"))) < processes:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(
                    f"the run never reached step {step}: {(out_dir / 'killed.log').read_text()[-4000:]}"
                )
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
