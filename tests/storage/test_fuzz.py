"""Every file of a small snapshot and a small log, damaged in many ways, one case at a time.

The cases come from fixed seeds, so CI runs the same ones every time: bit flips, truncations,
deletions, JSON values of the wrong type, nested too deep or too large, and resealed edits (every
checksum recomputed, as anyone with write access can: `moai_ckpt.testing.tamper`). Each case runs
every read (list, open, restore, verify, read the log) and checks:

- only `MoaiCkptError` ever escapes, within a deadline, and memory stays bounded
  (``max_array_bytes`` is 1 MiB here);
- a failed restore leaves every object untouched, bit for bit;
- after a plain edit (checksums not recomputed) a restore returns exactly what was saved or fails,
  a log read returns a prefix of the records written and says why it stopped, and a snapshot that
  verifies restores what was saved.

After a resealed edit no checksum can tell (they are not authentication; see docs/security.md):
a read may return what the forger wrote, and only the first invariant and the untouched objects
are owed.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from moai_ckpt import Checkpointer, MoaiCkptError
from moai_ckpt.arrays import array_metadata
from moai_ckpt.dtypes import from_name
from moai_ckpt.format import ArrayRecord
from moai_ckpt.layout import snapshot_dir
from moai_ckpt.storage import open_storage
from moai_ckpt.testing import tamper
from replay.log import Digests, LogContents, LogWriter, StepRecord, read_log, records_after
from tests.helpers import fingerprint

STEP = 3
DEADLINE_S = 60.0
MEMORY_GROWTH_LIMIT = 256 << 20  # bytes of peak RSS one case may add (arrays are capped at 1 MiB)
OPTIONS = {"chunk_bytes": 32, "capture_rng": False, "io_threads": 2, "max_array_bytes": 1 << 20}


def build_state(seed: int) -> dict[str, Any]:
    """A module, an optimizer with state, tensors of several dtypes, generators and JSON extras."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_buffer("seen", torch.tensor(seed, dtype=torch.int64))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": model,
        "optim": optim,
        "bf16": torch.randn(5, 3, generator=gen).bfloat16(),
        "half": torch.randn(7, generator=gen).half(),
        "mask": torch.rand(9, generator=gen) > 0.5,
        "ids": torch.arange(6) * (seed + 1),
        "py_rng": random.Random(seed),
        "np_rng": np.random.default_rng(seed),
        "extra": {
            "tokens": 7 + seed,
            "nan": float("nan"),
            "pair": (1, "a"),
            "by_id": {3: "x"},
            "raw": b"\x00\xff",
            "scale": np.float32(1.5 + seed),
            "dtype": torch.bfloat16,
            "nested": {"a": [1, {"b": None}]},
        },
    }


def log_record(step: int, blob: str) -> StepRecord:
    return StepRecord(
        step=step,
        samples=[step * 2, step * 2 + 1],
        rng={"0": {"torch_cpu": blob}},
        hparams={"optim.0.lr": 0.01 / step, "betas": [0.9, 0.95]},
        digests=Digests(loss=1.0 / step, grad_norm=0.5, state=float.hex(float(step))),
    )


@dataclass(frozen=True)
class Pristine:
    root: Path
    saved: Any  # fingerprint of the saved state
    log: LogContents
    files: list[str]  # every file below the run directory, relative to it


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("fuzz") / "run"
    state = build_state(seed=0)
    with Checkpointer(str(root), **OPTIONS) as ckpt:
        ckpt.save(STEP, state, info={"note": "fuzz"})
        writer = LogWriter(ckpt.storage, STEP, flush_every=2)
        for step in range(STEP + 1, STEP + 5):
            writer.append(log_record(step, writer.put_blob(f"rng state {step % 2}".encode())))
        writer.close()
        log = read_log(ckpt.storage, STEP)
    assert len(log.records) == 4 and log.corruption is None and log.torn_tail is None
    run_json = root / "run.json"
    run_json.unlink()  # only the command line's restore paths read run.json; none of these reads does
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return Pristine(root, fingerprint(state), log, files)


# -- the reads and their invariants -----------------------------------------------------------------


def read_everything(root: Path, pristine: Pristine, *, plain: bool, log_shortened_ok: bool = False) -> list[str]:
    """Run every read against ``root``; return every broken invariant (empty when all hold)."""
    problems: list[str] = []

    def attempt(what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except MoaiCkptError as exc:
            return False, exc
        except Exception as exc:  # noqa: BLE001 - this is what the suite hunts for
            problems.append(f"{what} raised {type(exc).__name__}: {str(exc)[:300]}")
            return False, exc

    with Checkpointer(str(root), **OPTIONS) as ckpt:
        attempt("scan", ckpt.scan)
        attempt("steps", ckpt.steps)
        attempt("latest_step", ckpt.latest_step)
        attempt("open_snapshot", lambda: ckpt.open_snapshot(STEP).manifest)
        fresh = build_state(seed=1)
        before = fingerprint(fresh)
        restored, _ = attempt("restore", lambda: ckpt.restore(fresh))
        after = fingerprint(fresh)
        if not restored and after != before:
            problems.append("a failed restore changed the objects")
        if restored and plain and after != pristine.saved:
            problems.append("restore returned data that differs from what was saved, and no check noticed")
        verified, report = attempt("verify", lambda: ckpt.verify(STEP))
        if plain and verified and report.ok and not restored:
            problems.append("verify reports the snapshot sound, but restore refuses it")
        storage = open_storage(str(root))
        for name, read in (("read_log", read_log), ("records_after", records_after)):
            ok, contents = attempt(name, lambda read=read: read(storage, STEP))  # type: ignore[misc]
            if ok and plain:
                problems += _log_problems(name, contents, pristine.log, log_shortened_ok)
    return problems


def _log_problems(name: str, got: LogContents, want: LogContents, shortened_ok: bool) -> list[str]:
    n = len(got.records)
    if got.records != want.records[:n]:
        return [f"{name} returned records that differ from those written"]
    if any(got.blobs.get(d) != want.blobs[d] for r in got.records for d in r.blob_refs()):
        return [f"{name} returned a blob that differs from the one written"]
    if n < len(want.records) and got.corruption is None and got.torn_tail is None and not shortened_ok:
        return [f"{name} returned {n} of {len(want.records)} records without saying why it stopped"]
    return []


@dataclass(frozen=True)
class Case:
    """One edit of a copy of the pristine run directory."""

    name: str
    edit: Callable[[Path], None]
    plain: bool  # checksums left as they were: a read must notice, or return exactly what was saved
    log_shortened_ok: bool = False  # a whole segment gone: a log may end earlier, undetectably


class WorkingCopy:
    """A copy of the pristine run directory, put back file by file after each case (cheaper than a copy)."""

    def __init__(self, pristine: Pristine, root: Path) -> None:
        shutil.copytree(pristine.root, root)
        self.root = root
        self.data = {rel: (root / rel).read_bytes() for rel in pristine.files}

    def reset(self) -> None:
        for rel, data in self.data.items():
            path = self.root / rel
            if not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)


def within_deadline(fn: Callable[[], list[str]], what: str) -> list[str]:
    """``fn()`` on a daemon thread; a read still running after `DEADLINE_S` fails the test as a hang."""
    result: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="fuzz-case", daemon=True)  # a hung one cannot hold up the exit
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        pytest.fail(f"{what}: the reads did not finish within {DEADLINE_S:.0f} s (a hang)")
    if errors:
        raise errors[0]
    return result[0]


def run_cases(cases: list[Case], pristine: Pristine, tmp_path: Path) -> None:
    """Run every case against the pristine run with its edit; fail listing every broken invariant."""
    failures: list[str] = []
    work = WorkingCopy(pristine, tmp_path / "run")
    for case in cases:
        case.edit(work.root)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        problems = within_deadline(
            lambda case=case: read_everything(  # type: ignore[misc]
                work.root, pristine, plain=case.plain, log_shortened_ok=case.log_shortened_ok
            ),
            case.name,
        )
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
        if grown > MEMORY_GROWTH_LIMIT:
            problems.append(f"peak memory grew by {grown >> 20} MiB")
        failures += [f"{case.name}: {p}" for p in problems]
        work.reset()
    assert not failures, f"{len(failures)} broken invariant(s) in {len(cases)} cases:\n" + "\n".join(failures[:40])


# -- the edits --------------------------------------------------------------------------------------


def _seeded(name: str) -> random.Random:
    return random.Random(f"moai-ckpt fuzz {name}")


def _is_json(rel: str) -> bool:
    return rel.endswith(".json")


def _is_chunk(rel: str) -> bool:
    last = rel.rsplit("/", 1)[-1]
    return rel.startswith("snapshots/") and (last == "c" or last.isdigit())


def _is_segment(rel: str) -> bool:
    return rel.startswith("log/") and rel.endswith(".seg")


def _reseal_for(rel: str) -> Callable[[Path], None]:
    """What an attacker recomputes after editing ``rel``: everything that vouches for it."""
    if _is_segment(rel):
        return lambda root: tamper.reseal_segment(root / rel)
    return lambda root: tamper.reseal_snapshot(root, STEP)


def _then(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)

    return edit


def flips(pristine: Pristine) -> Iterator[Case]:
    for rel in pristine.files:
        size = (pristine.root / rel).stat().st_size
        rng = _seeded(f"flip {rel}")
        for bit in sorted({rng.randrange(size * 8) for _ in range(3)}):
            flip = lambda root, rel=rel, bit=bit: tamper.flip_bit(root / rel, bit)  # noqa: E731
            yield Case(f"flip bit {bit} of {rel}", flip, plain=True)
        if not _is_json(rel):  # a JSON file no longer parses after most flips; resealing it changes nothing
            bit = rng.randrange(size * 8)
            flip = lambda root, rel=rel, bit=bit: tamper.flip_bit(root / rel, bit)  # noqa: E731
            yield Case(f"flip bit {bit} of {rel}, resealed", _then(flip, _reseal_for(rel)), plain=False)


def truncations(pristine: Pristine) -> Iterator[Case]:
    for rel in pristine.files:
        size = (pristine.root / rel).stat().st_size
        rng = _seeded(f"truncate {rel}")
        for keep in sorted({0, size - 1, rng.randrange(size)}):
            cut = lambda root, rel=rel, keep=keep: tamper.truncate(root / rel, keep)  # noqa: E731
            yield Case(f"truncate {rel} to {keep} of {size} bytes", cut, plain=True)
        if _is_chunk(rel) or _is_segment(rel):
            keep = rng.randrange(size)
            cut = lambda root, rel=rel, keep=keep: tamper.truncate(root / rel, keep)  # noqa: E731
            yield Case(f"truncate {rel} to {keep} bytes, resealed", _then(cut, _reseal_for(rel)), plain=False)


def deletions(pristine: Pristine) -> Iterator[Case]:
    for rel in pristine.files:
        gone = lambda root, rel=rel: (root / rel).unlink()  # noqa: E731
        yield Case(f"delete {rel}", gone, plain=True, log_shortened_ok=_is_segment(rel))
        if not _is_segment(rel):
            yield Case(f"delete {rel}, resealed", _then(gone, _reseal_for(rel)), plain=False)


def _patterns(document: Any) -> list[tuple[str | int, ...]]:
    """One path per node pattern (list indices and array names generalised), in document order."""
    seen: dict[tuple[str, ...], tuple[str | int, ...]] = {}
    for path in tamper.json_paths(document):
        pattern = tuple(
            "*" if isinstance(p, int) or (i and path[i - 1] in ("arrays", "chunks")) else str(p)
            for i, p in enumerate(path)
        )
        seen.setdefault(pattern, path)
    return list(seen.values())


def confusions(pristine: Pristine) -> Iterator[Case]:
    """Wrong types, huge numbers and deep nesting at one node of each pattern of every JSON file."""
    for rel in [f for f in pristine.files if _is_json(f)]:
        document = json.loads((pristine.root / rel).read_bytes())
        rng = _seeded(f"confuse {rel}")
        patterns = _patterns(document)
        limit = 8 if rel.endswith("zarr.json") else 60  # the array documents all have one shape
        for path in sorted(rng.sample(range(len(patterns)), min(limit, len(patterns)))):
            path = patterns[path]
            label, value = rng.choice([*tamper.CONFUSIONS, ("deep", tamper.deep_json())])

            def confuse(root: Path, rel: str = rel, path: Any = path, value: Any = value) -> None:
                tamper.edit_json(root / rel, lambda doc: tamper.replace_at(doc, path, json.loads(json.dumps(value))))

            where = "/".join(map(str, path)) or "the root"
            yield Case(f"{rel}: {label} at {where}, resealed", _then(confuse, _reseal_for(rel)), plain=False)
            if rng.random() < 0.25:
                yield Case(f"{rel}: {label} at {where}", confuse, plain=True)


def log_edits(pristine: Pristine) -> Iterator[Case]:
    """Records of the wrong shape, reframed with a valid crc32c; blobs forged under their own sha256."""
    for rel in [f for f in pristine.files if _is_segment(f)]:
        frames = tamper.frames((pristine.root / rel).read_bytes())
        rng = _seeded(f"log {rel}")
        for index, (_, kind, payload) in enumerate(frames):
            if kind == b"MBLB":
                forge = lambda root, rel=rel, index=index: tamper.replace_blob(  # noqa: E731
                    root / rel.rsplit("/", 1)[0], root / rel, index, b"forged state"
                )
                yield Case(f"{rel}: blob frame {index} forged", forge, plain=False)
                continue
            document = json.loads(payload)
            for path in _patterns(document):
                label, value = rng.choice([*tamper.CONFUSIONS, ("deep", tamper.deep_json())])
                text = json.dumps(tamper.replace_at(json.loads(payload), path, value))
                text = text.replace(json.dumps(tamper.deep_json()), "[" * 100_000 + "]" * 100_000)
                reframe = lambda root, rel=rel, i=index, t=text: tamper.replace_frame(root / rel, i, t.encode())  # noqa: E731
                where = "/".join(map(str, path)) or "the root"
                yield Case(f"{rel}: frame {index} {kind.decode()} {label} at {where}, reframed", reframe, plain=False)


def _edit_manifest_array(name: str, change: Callable[[dict[str, Any]], None], *, zarr_json: bool = False):
    """A resealed manifest edit of one array record (and its zarr.json written to match, if asked)."""

    def edit(root: Path) -> None:
        path = root / snapshot_dir(STEP) / "manifest.json"
        manifest = json.loads(path.read_bytes())
        change(manifest["arrays"][name])
        path.write_text(json.dumps(manifest))
        if zarr_json:
            record = ArrayRecord.model_validate(manifest["arrays"][name])
            meta = array_metadata(record, from_name(record.dtype))
            (root / snapshot_dir(STEP) / name / "zarr.json").write_text(json.dumps(meta))
        tamper.reseal_snapshot(root, STEP)

    return edit


def crafted() -> Iterator[Case]:
    """Forgeries aimed at allocation and chunk listing, each consistent wherever the forger can make it so."""
    weight = "model/0.weight"
    shapes = {
        "shape [1e12, 4], chunks of one row": ([10**12, 4], [1, 4]),
        "shape [1e12, 4], one chunk": ([10**12, 4], [10**12, 4]),
        "shape [2**64, 4]": ([2**64, 4], [1, 4]),
        "shape [0, 2**64]": ([0, 2**64], [1, 2**64]),
        "chunks [0, 4]": ([3, 4], [0, 4]),
        "chunks []": ([3, 4], []),
        "chunks cut dimension 1": ([3, 4], [3, 2]),
        "shape [3, 4, 1]": ([3, 4, 1], [3, 4, 1]),
    }
    for label, (shape, chunks) in shapes.items():

        def change(record: dict[str, Any], shape: list[int] = shape, chunks: list[int] = chunks) -> None:
            record["shape"], record["chunks"] = shape, chunks

        yield Case(f"manifest {weight}: {label}", _edit_manifest_array(weight, change), plain=False)
        yield Case(
            f"manifest {weight}: {label}, zarr.json to match",
            _edit_manifest_array(weight, change, zarr_json=True),
            plain=False,
        )
    for dtype in ("float16", "float99", "int64", "uint16"):

        def relabel(record: dict[str, Any], dtype: str = dtype) -> None:
            record["dtype"] = dtype

        yield Case(f"manifest bf16/value relabelled {dtype}", _edit_manifest_array("bf16/value", relabel), plain=False)
        if dtype != "float99":
            yield Case(
                f"manifest bf16/value relabelled {dtype}, zarr.json to match",
                _edit_manifest_array("bf16/value", relabel, zarr_json=True),
                plain=False,
            )

    def huge_entry(root: Path) -> None:
        path = next((root / snapshot_dir(STEP) / "ranks").iterdir())
        index = json.loads(path.read_bytes())
        for entries in index["chunks"].values():
            for entry in entries:
                entry["nbytes"] = 10**15
        path.write_text(json.dumps(index))
        tamper.reseal_snapshot(root, STEP, chunks=False)

    yield Case("rank index: every chunk claims 1e15 bytes", huge_entry, plain=False)


# -- the tests --------------------------------------------------------------------------------------


def test_the_pristine_run_reads_back_exactly(pristine: Pristine, tmp_path: Path) -> None:
    run_cases([Case("no edit", lambda root: None, plain=True)], pristine, tmp_path)
    assert any(rel.endswith("zarr.json") for rel in pristine.files) and any(map(_is_segment, pristine.files))


def test_bit_flips_are_caught_or_harmless(pristine: Pristine, tmp_path: Path) -> None:
    run_cases(list(flips(pristine)), pristine, tmp_path)


def test_truncations_are_caught_or_harmless(pristine: Pristine, tmp_path: Path) -> None:
    run_cases(list(truncations(pristine)), pristine, tmp_path)


def test_deleted_files_are_caught_or_harmless(pristine: Pristine, tmp_path: Path) -> None:
    run_cases(list(deletions(pristine)), pristine, tmp_path)


def test_json_of_the_wrong_type_too_deep_or_too_large_fails_cleanly(pristine: Pristine, tmp_path: Path) -> None:
    run_cases(list(confusions(pristine)), pristine, tmp_path)


def test_forged_log_records_and_blobs_fail_cleanly(pristine: Pristine, tmp_path: Path) -> None:
    run_cases(list(log_edits(pristine)), pristine, tmp_path)


def test_forged_shapes_and_sizes_are_refused_before_anything_is_allocated(pristine: Pristine, tmp_path: Path) -> None:
    run_cases(list(crafted()), pristine, tmp_path)


def test_every_case_has_its_own_name(pristine: Pristine) -> None:
    cases = [*flips(pristine), *truncations(pristine), *deletions(pristine), *confusions(pristine)]
    names = [c.name for c in [*cases, *log_edits(pristine), *crafted()]]
    assert len(names) == len(set(names)), "a failure must name the case that broke"
