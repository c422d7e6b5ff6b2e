"""A capture read from storage names the ops a code-free replay runs: only tensor ops may run."""

from __future__ import annotations

import pytest
import torch

from replay.opreplay import resolve
from replay.ops import OpCaptureError


@pytest.mark.parametrize("name", ["aten.from_file.default", "aten._print.default"])
def test_ops_that_reach_files_or_the_console_are_refused(name: str) -> None:
    with pytest.raises(OpCaptureError, match="outside tensors"):
        resolve(name)


@pytest.mark.parametrize("name", ["os.system.default", "builtins.eval.default", "aten.add", "aten..Tensor"])
def test_only_aten_and_prims_ops_by_exact_name_resolve(name: str) -> None:
    with pytest.raises(OpCaptureError):
        resolve(name)


def test_tensor_ops_resolve_to_torchs_own_overloads() -> None:
    assert resolve("aten.add.Tensor") is torch.ops.aten.add.Tensor
    assert resolve("aten.mm.default") is torch.ops.aten.mm.default
