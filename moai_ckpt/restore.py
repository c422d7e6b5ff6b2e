"""Restoring a committed snapshot into live objects: everything read and checked first, then loaded.

Every rank opens the snapshot (`moai_ckpt.snapshot.SnapshotReader` checks the marker, manifest
and rank indexes), reads exactly the rows its live tensors need (`moai_ckpt.sharding.live_targets`:
a different world size or sharding is another read pattern), picks its copy of each rank-local
tensor (`moai_ckpt.ranklocal.choose`), and checks every entry against its live object
(`moai_ckpt.capture.Restorer.check`). The ranks vote (`moai_ckpt.distributed.agree`); only when
every rank is ready does any of them load. With fallback, an unusable snapshot gives way to the
next older committed one, the same on every rank.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import MutableMapping
from typing import Any

import torch

from moai_ckpt.capture import RNG_KEY, PartialState, Restorer
from moai_ckpt.catalog import SnapshotCatalog
from moai_ckpt.distributed import World, agree
from moai_ckpt.errors import (
    CoordinationError,
    CorruptSnapshotError,
    RankLostError,
    SnapshotNotFoundError,
    UnsupportedFormatError,
    redact_url,
)
from moai_ckpt.ranklocal import RankLocalChoice, choose
from moai_ckpt.results import RestoreInfo, skipped_message
from moai_ckpt.rng import GlobalRNG
from moai_ckpt.sharding import live_targets
from moai_ckpt.snapshot import Progress
from moai_ckpt.staging import rng_key
from moai_ckpt.tree import tensor_refs

log = logging.getLogger("moai_ckpt")

#: what makes a snapshot unusable, so that a restore with fallback tries an older one
_UNUSABLE = (CorruptSnapshotError, UnsupportedFormatError, SnapshotNotFoundError, CoordinationError)


class SnapshotRestore:
    """Restores of one run directory, on one rank.

    Args:
        catalog: the run's snapshots (and its storage).
        world: the ranks taking part.
        capture_rng: restore the global RNG states unless a restore says otherwise.
    """

    def __init__(self, catalog: SnapshotCatalog, world: World, *, capture_rng: bool) -> None:
        self.catalog = catalog
        self.world = world
        self.capture_rng = capture_rng

    @property
    def url(self) -> str:
        return self.catalog.storage.url

    def run(
        self,
        state: MutableMapping[str, Any],
        step: int | None,
        *,
        fallback: bool,
        restore_rng: bool | None,
        progress: Progress | None,
    ) -> RestoreInfo:
        """Load a committed snapshot into ``state`` (see `Checkpointer.restore`); says what it loaded."""
        first = self.catalog.resolve(step)  # every rank lists; rank 0's answer is the one all use
        newer_first = [s for s in reversed(self.catalog.steps()) if s != first]
        order = [first] + (newer_first if fallback and step is None else [])
        chosen = self.world.broadcast_json(order, "restore: choosing the step")
        errors: list[str] = []
        for candidate in chosen:

            def prepare(candidate: int = candidate) -> tuple[dict[str, Any], Restorer, RankLocalChoice]:
                return self._prepare(candidate, state, restore_rng, progress)

            try:
                prepared = agree(self.world, f"restore of step {candidate}", prepare, url=self.url, step=candidate)
            except _UNUSABLE as exc:
                if not fallback or isinstance(exc, RankLostError):
                    raise
                errors.append(f"step {candidate}: {exc}")
                log.warning("snapshot at step %d is unusable, trying an older one: %s", candidate, exc)
                continue
            wanted, restorer, rank_local = prepared
            restorer.apply(wanted)
            for key in state:
                state[key] = wanted[key]
            self._report(candidate, rank_local, errors, newest_wanted=step is None)
            return RestoreInfo(self.url, candidate, rank_local)
        raise CorruptSnapshotError("no committed snapshot could be restored: " + "; ".join(errors), url=self.url)

    def _report(self, step: int, rank_local: RankLocalChoice, errors: list[str], *, newest_wanted: bool) -> None:
        """Say which copy of rank-local state was restored, and which newer snapshots were passed over."""
        if rank_local.copies and self.world.rank == 0:
            log.log(
                logging.INFO if rank_local.per_rank else logging.WARNING,
                "restored step %d from %s: %s",
                step,
                self.url,
                rank_local.describe(),
            )
        if errors:
            warnings.warn(
                f"restored step {step} from {redact_url(self.url)} instead of newer corrupt snapshot(s): "
                + "; ".join(errors),
                stacklevel=4,
            )
        skipped = self.catalog.damaged_after(step) if newest_wanted and self.world.rank == 0 else []
        if skipped:
            message = f"{self.url}: {skipped_message(skipped, step)}"
            log.warning("%s", message)
            warnings.warn(message, stacklevel=4)

    def _prepare(
        self, step: int, state: MutableMapping[str, Any], restore_rng: bool | None, progress: Progress | None
    ) -> tuple[dict[str, Any], Restorer, RankLocalChoice]:
        """Read and check everything this rank needs of ``step``; touch nothing yet.

        Of a rank-local array, the copy `moai_ckpt.ranklocal.choose` picks is read (this rank's
        own on the world size that saved, else the lowest rank's) and stands under the plain name.
        """
        reader = self.catalog.open(step)
        manifest = reader.manifest
        wanted = dict(state)
        rng = self.capture_rng if restore_rng is None else restore_rng
        own_rng = rng_key(self.world.rank)
        records = dict(manifest.objects)
        if rng and own_rng in records:
            wanted[own_rng] = GlobalRNG()
        elif rng and RNG_KEY in records:
            log.warning(
                "snapshot has no RNG state for rank %d (saved with %d ranks); RNGs of this rank are not restored",
                self.world.rank,
                manifest.world_size,
            )
        for key, obj in wanted.items():
            record = records.get(key)
            if isinstance(obj, PartialState) and record is not None and isinstance(record.tree, dict):
                # only the entries this rank holds: another split of them is another read pattern
                held = obj.holds()
                tree = {e: record.tree[e] for e in held if e in record.tree}
                records[key] = record.model_copy(update={"tree": tree})
        names = sorted({ref for key in wanted if key in records for ref in tensor_refs(records[key].tree)})
        source, rank_local = choose(
            manifest.rank_local,
            set(names),
            saved_world_size=manifest.world_size,
            world_size=self.world.world_size,
            rank=self.world.rank,
        )
        arrays = {**manifest.arrays, **{name: manifest.arrays[path] for name, path in source.items()}}
        targets = live_targets(records, wanted, arrays)
        rows = {source.get(name, name): (t.start, t.stop) for name, t in targets.items()}
        # arrays bound for a CUDA device go there chunk by chunk, through pinned memory, as each passes its check
        devices = {source.get(name, name): d for name, t in targets.items() if (d := _cuda_of(t.like)) is not None}
        raw = reader.read_arrays(sorted({source.get(name, name) for name in names}), progress, rows, devices)
        tensors = {}
        for name in names:
            rows_read, target = raw[source.get(name, name)], targets.get(name)
            tensors[name] = (
                rows_read if target is None else target.wrap(rows_read, arrays[name].shape, _device_of(target.like))
            )
        restorer = Restorer(records, tensors, url=self.url, step=step)
        restorer.check(wanted)
        return wanted, restorer, rank_local


def _cuda_of(t: torch.Tensor | None) -> torch.device | None:
    """The CUDA device a live tensor is on, or None (elsewhere, or no CUDA here)."""
    device = _device_of(t)
    return device if device is not None and device.type == "cuda" and torch.cuda.is_available() else None


def _device_of(t: torch.Tensor | None) -> torch.device | None:
    if not isinstance(t, torch.Tensor):  # a forged tree may reference an array where a value lives
        return None
    local = t.to_local() if hasattr(t, "to_local") else t
    return None if local.device.type == "meta" else local.device
