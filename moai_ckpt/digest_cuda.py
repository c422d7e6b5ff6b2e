"""The fused CUDA kernel of the device digest: one read of every word, two launches for all tensors.

`word_sums(words)` takes 1-D int32 views of CUDA tensors and returns int64 ``[k, 2]`` on their
device: each tensor's plain word sum and the sum of `moai_ckpt.digest.mix` over its words, the
very integers `moai_ckpt.digest.reference_sums` computes with torch operations (the GPU tests
compare the two). Unfused, the same digest costs a dozen kernels and as many full passes of
int64 temporaries per tensor; fused, it reads each word once.

The kernel walks a block table, one row per 4096-word block of any tensor (address, words in the
block, tensor index, position of its first word), and adds each block's two sums into its
tensor's row with integer atomics (exact, so the order does not matter). The table is built on
the host once per set of tensors (their addresses and sizes: a job's parameters and optimizer
state keep theirs from step to step) and copied to the device from pinned memory without a wait.
Without Triton (CPU builds of torch) `available` is False and callers use the torch path.
"""

from __future__ import annotations

import functools
import logging

import torch

BLOCK = 4096
log = logging.getLogger("moai_ckpt.digest")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

__all__ = ["BLOCK", "available", "block_table", "disable", "launch", "word_sums"]


_broken: list[str] = []  # why the kernel failed here, once: the torch path takes over for good


def available() -> bool:
    """Whether the fused kernel can run here (Triton is importable and has not failed)."""
    return triton is not None and not _broken


def disable(reason: str) -> None:
    """Stop using the kernel in this process (it failed to compile or run: say why, once)."""
    if not _broken:
        _broken.append(reason)
        log.warning("the fused CUDA digest kernel is off (%s); digests use torch operations, same results", reason)


if triton is not None:

    @triton.jit
    def _sums_kernel(table_ptr, out_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = table_ptr + tl.program_id(0) * 4
        address, count = tl.load(row), tl.load(row + 1)
        tensor, first = tl.load(row + 2), tl.load(row + 3)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < count
        raw = tl.load(address.to(tl.pointer_type(tl.int32)) + offsets, mask=mask, other=0)
        words = raw.to(tl.int64)  # sign-extended, as the reference's int32 -> int64
        # moai_ckpt.digest.mix in native 32-bit wrapping arithmetic (logical shifts on uint32):
        # the same integers as the reference's int64 arithmetic with 32-bit masks, without the
        # 64-bit multiplies the GPU emulates
        u = raw.to(tl.uint32, bitcast=True)
        at = ((first + offsets) & 0xFFFFFFFF).to(tl.uint32)
        k_word = tl.full([BLOCK], 0x9E3779B1, tl.uint32)
        k_pos = tl.full([BLOCK], 0x85EBCA77, tl.uint32)
        k_mix1 = tl.full([BLOCK], 0x7FEB352D, tl.uint32)
        k_mix2 = tl.full([BLOCK], 0x846CA68B, tl.uint32)
        x = u * k_word + at * k_pos
        x = x ^ (x >> 16)
        x = x * k_mix1
        x = x ^ (x >> 15)
        x = x * k_mix2
        x = (x ^ (x >> 16)).to(tl.int64)  # zero-extended: below 2**32, as the reference's
        tl.atomic_add(out_ptr + tensor * 2, tl.sum(words, axis=0))
        tl.atomic_add(out_ptr + tensor * 2 + 1, tl.sum(tl.where(mask, x, 0), axis=0))


def block_table(layout: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The block table of tensors at ``layout`` ((address, words) each), on ``device``, and its row count.

    The pinned host copy is returned too: whoever keeps the table keeps it, so that the copy
    (queued without a wait) cannot outlive its source.
    """
    rows = [
        (address + 4 * start, min(BLOCK, words - start), index, start)
        for index, (address, words) in enumerate(layout)
        for start in range(0, words, BLOCK)
    ]
    host = torch.tensor(rows or [(0, 0, 0, 0)], dtype=torch.int64).pin_memory()
    return host.to(device, non_blocking=True), host, len(rows)


_table = functools.lru_cache(maxsize=32)(block_table)


def launch(table: torch.Tensor, blocks: int, out: torch.Tensor) -> None:
    """Add the sums of the ``blocks`` rows of ``table`` into ``out`` (int64 [k, 2], zeroed), one launch."""
    if blocks:
        with torch.cuda.device(out.device):
            _sums_kernel[(blocks,)](table, out, BLOCK=BLOCK)


def word_sums(words: list[torch.Tensor]) -> torch.Tensor:
    """int64 [k, 2]: the plain and the mixed sum of each 1-D int32 CUDA tensor, in one kernel."""
    device = words[0].device
    out = torch.zeros(len(words), 2, dtype=torch.int64, device=device)
    table, _, blocks = _table(tuple((w.data_ptr(), w.numel()) for w in words), device)
    launch(table, blocks, out)
    return out
