from __future__ import annotations

import os

import pytest
import torch

from moai_ckpt.testing import protocols

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# faulty:// resolves in this process and in every process a test starts (subprocesses, torchrun
# workers), installed or not: see moai_ckpt.testing.protocols
protocols.register()
os.environ.update(protocols.child_environment(os.environ))


@pytest.fixture
def run_dir(tmp_path) -> str:
    """A fresh local run directory (as a plain path string, the way users pass it)."""
    return str(tmp_path / "run")
