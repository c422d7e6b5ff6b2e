"""Rank-local state: tensors taken as replicated that really differ between ranks.

A distributed save takes every tensor that is not a DTensor as replicated and writes it once. That
is checked, not assumed: each rank digests those tensors where they live (`moai_ckpt.digest`:
crc32c on the CPU, word sums on a device, no host copy), the digests travel in the save's
planning all-gather, and a tensor whose holders' digests differ is *rank-local* (DDP BatchNorm
buffers without SyncBatchNorm, which each rank updates from its own batch; per-rank EMA copies).

Each holder's copy of a rank-local tensor is then its own array: the lowest holder's (rank 0's
under DDP) under the plain name, so plain zarr readers see the copy the job would use, and every
other holder's as ``<name>.rank<r>``. The manifest lists them (`Manifest.rank_local`).

A restore on the world size that saved gives each rank its own copy. On another world size every
rank takes the lowest holder's copy: what DDP itself would use, since it broadcasts rank 0's
buffers at the next forward. `RankLocalChoice` says which copy a rank restored.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.sharding import Piece

__all__ = ["RankLocalChoice", "choose", "copy_name", "find_rank_local", "split_pieces"]


def copy_name(name: str, rank: int, taken: set[str]) -> str:
    """The array path of rank ``rank``'s copy of ``name``, unused by any other array (any case)."""
    candidate = f"{name}.rank{rank}"
    while candidate.lower() in taken:
        candidate += "_"
    taken.add(candidate.lower())
    return candidate


def find_rank_local(
    pieces_by_rank: list[dict[str, Piece]], digests_by_rank: list[Mapping[str, str]]
) -> dict[str, dict[int, str]]:
    """Arrays whose holders sent different digests -> holder rank -> the array path of its copy.

    Only arrays held by two or more ranks are compared; the lowest holder's copy keeps the name.
    Deterministic, so every rank computes the same answer from the same gathered messages.
    """
    taken = {name.lower() for pieces in pieces_by_rank for name in pieces}
    out: dict[str, dict[int, str]] = {}
    for name in sorted({name for digests in digests_by_rank for name in digests}):
        holders = [rank for rank, digests in enumerate(digests_by_rank) if name in digests]
        if len(holders) < 2 or len({digests_by_rank[rank][name] for rank in holders}) == 1:
            continue
        first, *others = holders
        out[name] = {first: name} | {rank: copy_name(name, rank, taken) for rank in others}
    return out


def split_pieces(
    pieces_by_rank: list[dict[str, Piece]], rank_local: Mapping[str, Mapping[int, str]]
) -> list[dict[str, Piece]]:
    """Every rank's pieces with each rank-local array under the name of that rank's copy."""
    out = [dict(pieces) for pieces in pieces_by_rank]
    for name, copies in rank_local.items():
        for rank, path in copies.items():
            out[rank][path] = out[rank].pop(name)
    return out


class RankLocalChoice(BaseModel):
    """Which copy of each rank-local array one rank restored, and why.

    Attributes:
        saved_world_size: ranks that wrote the snapshot.
        world_size: ranks that restore it.
        rank: the restoring rank.
        copies: rank-local array -> the rank whose copy this rank restored.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    saved_world_size: int
    world_size: int
    rank: int
    copies: dict[str, int] = Field(default_factory=dict)

    @property
    def per_rank(self) -> bool:
        """Each rank restored its own copy (the world size is the one that saved)."""
        return self.saved_world_size == self.world_size

    def summary(self) -> dict[str, str]:
        """Array -> which copy the ranks restored, in words (the replay report records it)."""
        if self.per_rank:
            return {name: "each rank's own copy" for name in self.copies}
        return {
            name: f"rank {source}'s copy (saved on {self.saved_world_size} ranks, restored on {self.world_size})"
            for name, source in self.copies.items()
        }

    def describe(self) -> str:
        if not self.copies:
            return "no rank-local state"
        names = ", ".join(sorted(self.copies)[:5]) + (" ..." if len(self.copies) > 5 else "")
        if self.per_rank:
            return f"{len(self.copies)} rank-local array(s) ({names}): each rank restored its own copy"
        sources = sorted(set(self.copies.values()))
        return (
            f"{len(self.copies)} rank-local array(s) ({names}) saved on {self.saved_world_size} ranks, restored on "
            f"{self.world_size}: every rank took rank {', '.join(map(str, sources))}'s copy (what DDP uses: it "
            "broadcasts rank 0's buffers)"
        )


def choose(
    rank_local: Mapping[str, Mapping[int, str]],
    needed: set[str],
    *,
    saved_world_size: int,
    world_size: int,
    rank: int,
) -> tuple[dict[str, str], RankLocalChoice]:
    """(array -> the path of the copy to read, the choice) for the rank-local arrays in ``needed``.

    On the world size that saved, a rank reads its own copy (the lowest holder's if it held
    none); on any other, the lowest holder's copy, which is stored under the plain name.
    """
    sources: dict[str, str] = {}
    copies: dict[str, int] = {}
    for name in sorted(needed & set(rank_local)):
        held = rank_local[name]
        source = rank if saved_world_size == world_size and rank in held else min(held)
        sources[name], copies[name] = held[source], source
    choice = RankLocalChoice(saved_world_size=saved_world_size, world_size=world_size, rank=rank, copies=copies)
    return sources, choice
