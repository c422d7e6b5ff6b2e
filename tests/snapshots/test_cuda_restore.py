"""Restoring into CUDA objects: chunks read into pinned memory and copied to the device as each
passes its check, the live objects changed only after the last check (needs a GPU)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

import moai_ckpt
from moai_ckpt import snapshot
from moai_ckpt.layout import snapshot_dir
from tests.helpers import TinyNet, assert_bitwise_equal, tensors_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")

CHUNK_BYTES = 256  # several chunks per array, so the copies go chunk by chunk


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyNet().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randint(0, 32, (4, 8), device="cuda")).float().square().mean().backward()
        opt.step()
    return model, opt


def _copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, int, int]]:
    """Record every copy to the device: array, whether its host buffer is pinned, byte range."""
    seen: list[tuple[str, bool, int, int]] = []
    original = snapshot._ArrayRead.to_device

    def spy(self: Any, start: int, stop: int) -> None:
        if self.device is not None:  # arrays restored into CPU tensors (AdamW's steps) copy nothing
            seen.append((self.name, self.host.is_pinned(), start, stop))
        original(self, start, stop)

    monkeypatch.setattr(snapshot._ArrayRead, "to_device", spy)
    return seen


def test_a_restore_into_cuda_objects_copies_checked_chunks_from_pinned_memory(
    run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = _trained(0)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=CHUNK_BYTES, capture_rng=False)
    ckpt.save(1, {"model": model, "optim": opt})
    copies = _copies(monkeypatch)
    fresh, fresh_opt = _trained(1)
    ckpt.restore({"model": fresh, "optim": fresh_opt})
    assert_bitwise_equal(tensors_of(fresh.state_dict()), tensors_of(model.state_dict()))
    assert_bitwise_equal(tensors_of(fresh_opt.state_dict()), tensors_of(opt.state_dict()))
    assert all(p.is_cuda for p in fresh.parameters())
    # every array of the model went to the device through pinned memory, in more than one copy
    # where it has more than one chunk
    manifest = ckpt.manifest(1)
    model_arrays = {n for n in manifest.arrays if n.startswith("model/")}
    assert copies and all(pinned for _, pinned, _, _ in copies)
    assert model_arrays <= {name for name, *_ in copies}
    multi = [
        n
        for n in model_arrays
        if manifest.arrays[n].shape and manifest.arrays[n].chunks[0] < manifest.arrays[n].shape[0]
    ]
    assert multi, "the test needs arrays of several chunks"
    for name in multi:
        ranges = sorted((a, b) for n, _, a, b in copies if n == name)
        assert len(ranges) > 1 and ranges[0][0] == 0
        assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))  # chunk after chunk, no gap


def test_the_reader_returns_device_tensors_equal_to_a_cpu_read(run_dir: str) -> None:
    model, _ = _trained(0)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=CHUNK_BYTES, capture_rng=False)
    ckpt.save(1, {"model": model})
    reader = ckpt.catalog.open(1)
    names = sorted(reader.arrays)
    on_cpu = reader.read_arrays(names)
    device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = reader.read_arrays(names, devices=dict.fromkeys(names[::2], device))  # half of them
    for i, name in enumerate(names):
        assert on_gpu[name].is_cuda == (i % 2 == 0)
        assert torch.equal(on_gpu[name].cpu().view(torch.uint8), on_cpu[name].view(torch.uint8))


def test_a_bad_chunk_of_the_last_array_leaves_the_cuda_objects_untouched(run_dir: str) -> None:
    model, opt = _trained(0)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=CHUNK_BYTES, capture_rng=False)
    ckpt.save(1, {"model": model, "optim": opt})
    last = sorted(ckpt.manifest(1).arrays)[-1]
    chunk = sorted((Path(run_dir) / snapshot_dir(1) / last).glob("c*"))[-1]
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x01
    chunk.write_bytes(bytes(data))
    fresh, fresh_opt = _trained(1)
    before = {k: v.clone() for k, v in tensors_of(fresh.state_dict()).items()}
    opt_before = {k: v.clone() for k, v in tensors_of(fresh_opt.state_dict()).items()}
    with pytest.raises(moai_ckpt.ChecksumError) as info:
        ckpt.restore({"model": fresh, "optim": fresh_opt})
    assert info.value.key is not None and info.value.key.startswith(f"{snapshot_dir(1)}/{last}/")
    assert_bitwise_equal(tensors_of(fresh.state_dict()), before)
    assert_bitwise_equal(tensors_of(fresh_opt.state_dict()), opt_before)
