"""``s3://`` against a real S3-compatible server on loopback (moto), and object-store round trips.

The server runs in-process on 127.0.0.1 (`moai_ckpt.testing.s3`); the same Checkpointer round
trip also runs on ``memory://``, the other object-store-like back end with no directories.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import zarr
from torch import nn

from moai_ckpt import Checkpointer, RetryPolicy
from moai_ckpt.storage import FsspecStorage, Storage, open_storage
from moai_ckpt.testing import assert_bitwise_equal, tensors_of
from moai_ckpt.testing import s3 as s3_kit
from moai_ckpt.testing.storage_suite import StorageTests

pytestmark = pytest.mark.s3

# the plugin's fixtures, made visible to this module
s3_server = s3_kit.s3_server
s3_run = s3_kit.s3_run

FAST = RetryPolicy(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002, jitter_s=0.0, deadline_s=10)


class TestS3Storage(StorageTests):
    @pytest.fixture
    def storage(self, s3_run: s3_kit.S3Run) -> Storage:
        storage = open_storage(s3_run.url, FAST, **s3_run.storage_options)
        assert isinstance(storage, FsspecStorage)
        return storage


# -- the server helper ---------------------------------------------------------------------------


def test_the_server_listens_on_loopback_with_a_fresh_bucket(s3_server: s3_kit.S3Server) -> None:
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_server.storage_options["endpoint_url"] == s3_server.endpoint_url
    fs = s3_server.filesystem()
    assert fs.exists(s3_server.bucket)
    assert s3_server.url("run") == f"s3://{s3_server.bucket}/run"
    assert s3_server.url() != s3_server.url()


def test_every_aws_setting_points_at_loopback_while_the_server_runs(s3_server: s3_kit.S3Server) -> None:
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    assert "AWS_PROFILE" not in os.environ
    assert "127.0.0.1" in os.environ["NO_PROXY"]


def test_each_server_gets_its_own_file_system_and_the_environment_is_restored_after() -> None:
    before = os.environ.get("AWS_ENDPOINT_URL_S3")
    with s3_kit.moto_s3() as first:
        fs_first = open_storage(first.url("run"), **first.storage_options).fs  # type: ignore[attr-defined]
        with s3_kit.moto_s3() as second:
            fs_second = open_storage(second.url("run"), **second.storage_options).fs  # type: ignore[attr-defined]
        assert fs_first is not fs_second
        assert first.endpoint_url != second.endpoint_url
        assert os.environ["AWS_ENDPOINT_URL_S3"] == first.endpoint_url
    assert os.environ.get("AWS_ENDPOINT_URL_S3") == before


# -- a full Checkpointer round trip on object stores ---------------------------------------------


def small_model(seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A model whose arrays span several 4 KiB chunks (one with an edge), with AdamW."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    model.register_buffer("scale", torch.linspace(-1, 1, 7, dtype=torch.bfloat16))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        tokens = torch.randint(0, 100, (4, 6))
        loss = model(tokens).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def state_tensors(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return tensors_of({"model": model.state_dict(), "optim": optim.state_dict()})


@pytest.fixture(params=["s3", "memory"])
def object_store_run(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh run directory on an object store: (URL, storage options)."""
    if request.param == "s3":
        run: s3_kit.S3Run = request.getfixturevalue("s3_run")
        yield run.url, run.storage_options
        return
    root = f"/moai-test-{uuid.uuid4().hex[:12]}"
    yield f"memory://{root}/run", {}
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_save_verify_restore_and_prune_round_trip_bitwise(object_store_run: tuple[str, dict[str, Any]]) -> None:
    url, options = object_store_run
    model, optim = small_model(seed=0)
    with Checkpointer(url, chunk_bytes=4096, retry=FAST, **options) as ckpt:
        assert ckpt.steps() == []
        train(model, optim, 2)
        ckpt.save(2, {"model": model, "optim": optim, "extra": {"tokens": 48}})
        at_2 = state_tensors(model, optim)
        train(model, optim, 3)
        ckpt.save(5, {"model": model, "optim": optim, "extra": {"tokens": 120}})
        at_5 = state_tensors(model, optim)

        assert ckpt.steps() == [2, 5]
        assert ckpt.latest_step() == 5
        report = ckpt.verify(5)
        assert report.ok, report.faults
        assert report.arrays >= 5

        fresh, fresh_optim = small_model(seed=1)
        train(fresh, fresh_optim, 1)  # restore must overwrite a live optimizer state, not fill an empty one
        state: dict[str, Any] = {"model": fresh, "optim": fresh_optim, "extra": {}}
        assert ckpt.restore(state) == 5
        assert_bitwise_equal(state_tensors(fresh, fresh_optim), at_5)
        assert state["extra"] == {"tokens": 120}

        older, older_optim = small_model(seed=2)
        assert ckpt.restore({"model": older, "optim": older_optim}, step=2) == 2
        assert_bitwise_equal(state_tensors(older, older_optim), at_2)

        assert ckpt.prune(keep=1) == [2]
        assert ckpt.steps() == [5]
        assert ckpt.storage.list("snapshots/000000000002") == []
        assert ckpt.storage.list_dirs("snapshots") == ["000000000005"]

    # a new process sees the same run
    with Checkpointer(url, retry=FAST, **options) as reopened:
        again, again_optim = small_model(seed=3)
        assert reopened.restore({"model": again, "optim": again_optim}) == 5
        assert_bitwise_equal(state_tensors(again, again_optim), at_5)


def test_a_snapshot_on_s3_is_a_plain_zarr_group(s3_run: s3_kit.S3Run) -> None:
    model, _ = small_model(seed=0)
    with Checkpointer(s3_run.url, chunk_bytes=4096, retry=FAST, **s3_run.storage_options) as ckpt:
        ckpt.save(1, {"model": model})
    group = zarr.open_group(f"{s3_run.url}/snapshots/000000000001", mode="r", storage_options=s3_run.storage_options)
    weight = group["model/0.weight"]
    assert isinstance(weight, zarr.Array)
    assert weight.chunks[0] < weight.shape[0]  # several chunks, the last one padded
    assert torch.equal(torch.from_numpy(np.asarray(weight[:])), model.state_dict()["0.weight"])
