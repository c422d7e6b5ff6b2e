"""Device digests on CUDA compute exactly the integers the same algorithm gives on the CPU.

`moai_ckpt.digest.device_sums` reduces tensors on their own device (large tensors alone, small
ones batched by word type); the log's full-state digests and the save's replicated-state check
depend on it. These tests run where CUDA is (the GPU machine) and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from moai_ckpt.digest import SMALL_WORDS, device_sums, digest_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, generator=g),  # small, int32 words
        torch.randn(1000, 7, generator=g).bfloat16(),  # small, 2-byte words
        torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),  # odd bytes: byte words
        torch.randn(SMALL_WORDS + 12345, generator=g),  # large: reduced alone
        torch.randn(4096 * 3, generator=g).double(),  # large, 8-byte elements
        torch.tensor(7, dtype=torch.int64),  # 0-d
        torch.empty(0),
        torch.randn(64, 64, generator=g).t(),  # not contiguous
    ]


def test_cuda_sums_equal_the_cpu_reference_for_every_layout() -> None:
    cpu = _tensors()
    on_gpu = [t.cuda() for t in cpu]
    assert torch.equal(device_sums(on_gpu).cpu(), device_sums(cpu))


def test_a_flipped_bit_on_the_gpu_changes_exactly_its_tensors_digest() -> None:
    tensors = [t.cuda() for t in _tensors()]
    named = [(f"t{i}", t) for i, t in enumerate(tensors)]
    before = digest_tensors(named).wait()
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        words = t.view(-1).view(torch.uint8) if t.is_contiguous() else None
        if words is None:
            continue
        words[words.numel() // 2] ^= 0x10
        after = digest_tensors(named).wait()
        assert {k for k in before if before[k] != after[k]} == {f"t{i}"}
        words[words.numel() // 2] ^= 0x10
    assert digest_tensors(named).wait() == before


def test_digests_see_writes_queued_on_the_stream_before_them() -> None:
    x = torch.zeros(1 << 20, device="cuda")
    first = digest_tensors([("x", x)]).wait()["x"]
    x.add_(1.0)  # queued, not waited for
    second = digest_tensors([("x", x)]).wait()["x"]
    assert first != second


def test_the_fused_kernel_runs_here_and_matches_the_reference_over_many_blocks() -> None:
    from moai_ckpt import digest_cuda
    from moai_ckpt.digest import reference_sums

    assert digest_cuda.available(), "Triton is missing: the fused kernel would not be tested"
    g = torch.Generator().manual_seed(1)
    sizes = [1, 7, 4096, 4097, 3 * 4096 + 5, 1 << 20, 12_345_679]
    cpu = [torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32) for n in sizes]
    words = [t.cuda() for t in cpu]
    fused = digest_cuda.word_sums(words).cpu()
    assert torch.equal(fused, reference_sums(cpu))
    assert torch.equal(digest_cuda.word_sums(words).cpu(), fused)  # the cached block table, again
