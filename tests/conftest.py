from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def run_dir(tmp_path) -> str:
    """A fresh local run directory (as a plain path string, the way users pass it)."""
    return str(tmp_path / "run")
