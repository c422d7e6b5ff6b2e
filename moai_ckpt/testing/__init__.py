"""Test kit shipped with moai-ckpt: fault injection, a loopback S3 server, conformance suites.

Importing this package registers the ``faulty://`` fsspec protocol. The storage conformance
suite (`moai_ckpt.testing.storage_suite`) and the S3 server helpers (`moai_ckpt.testing.s3`)
need pytest and moto, so they are imported explicitly, not from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moai_ckpt.testing.faulty import (
    FaultEvent,
    FaultPlan,
    FaultStats,
    FaultyFileSystem,
    InjectedConnectionError,
    InjectedFault,
    InjectedPermissionError,
    InjectedTimeoutError,
    Outage,
)

__all__ = [
    "FaultEvent",
    "FaultPlan",
    "FaultStats",
    "FaultyFileSystem",
    "InjectedConnectionError",
    "InjectedFault",
    "InjectedPermissionError",
    "InjectedTimeoutError",
    "Outage",
    "assert_bitwise_equal",
    "tensors_of",
]


def tensors_of(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Copies of every tensor inside nested dicts, lists and tuples, keyed by their path.

    Example: ``tensors_of({"model": m.state_dict(), "optim": opt.state_dict()})``.
    """
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(tensors_of(value, f"{prefix}/{key}"))
    return out


def assert_bitwise_equal(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Assert two tensor maps hold the same names, dtypes, shapes and bytes (NaN and -0.0 included).

    Raises:
        AssertionError: naming the first tensor that differs.
    """
    assert actual.keys() == expected.keys(), f"names differ: {sorted(set(actual) ^ set(expected))}"
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), (
            f"{name}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
        )
        same = torch.equal(
            got.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
            want.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        )
        assert same, f"{name}: bytes differ"
