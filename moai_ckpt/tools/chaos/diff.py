"""What differs between a chaos trial's reference run and its faulty run.

`diff_final` compares the two final snapshots entry by entry: every array that differs (by its
stored name, ``model/b2.running_var``) and every JSON entry that differs (by its path inside its
object, ``_rng.1/python``), never just the objects that hold them. `first_step` compares the
first step each run logged: when the two already differ in step 1's *inputs* (the RNG states at
step start, the samples, the batch, the hyperparameters), the job itself is not reproducible from
its start, whatever moai-ckpt does later, and it says what to seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moai_ckpt import tree
from moai_ckpt.capture import RNG_KEY
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.keys import sanitize_segment
from replay.log import StepRecord, history

__all__ = ["ArrayDiff", "FinalDiff", "StartCheck", "diff_final", "first_step", "unused_generators"]

# what to seed, per generator of a log record (``gen:<name>`` are registered torch.Generators)
_SEED_ADVICE = {
    "torch_cpu": "torch's CPU generator: call torch.manual_seed(...) inside the training function",
    "cuda": "the CUDA generators: call torch.manual_seed(...) inside the training function",
    "numpy": "numpy's global generator: call np.random.seed(...) inside the training function",
    "python": "Python's random module: call random.seed(...) inside the training function",
    "gen": "a registered torch.Generator: call its manual_seed(...) inside the training function",
}
_WHERE = (
    "A seed set outside the training function (at import time of another module, or under "
    '`if __name__ == "__main__":`, which the chaos harness\'s workers never run) or not at all leaves '
    "the generator at a different state in every process"
)


@dataclass
class ArrayDiff:
    """One array of the final state that differs: its stored name and by how much."""

    name: str
    rel: float  # largest |a - b| / max |a| (inf: not comparable, e.g. integers or another shape)
    why: str = "values"  # "values", "shape", "dtype", "only in reference", "only in faulty run"


@dataclass
class FinalDiff:
    """How two final snapshots differ."""

    arrays: list[ArrayDiff] = field(default_factory=list)
    json_paths: list[str] = field(default_factory=list)  # JSON entries that differ, by path
    rngs: list[str] = field(default_factory=list)  # RNG states that differ: "_rng.1/numpy" (rank 1's)
    unused_rngs: list[str] = field(default_factory=list)  # differ, but neither run ever drew from them
    compared: int = 0  # arrays compared (the RNG states' arrays count with `rngs`)
    rel_l2: float | None = None  # tolerance mode: relative L2 distance over the model parameters
    model_arrays: int = 0

    @property
    def equal(self) -> bool:
        return not self.arrays and not self.json_paths and not self.rngs

    @property
    def worst(self) -> ArrayDiff | None:
        """The floating-point array that moved most (relatively); else the first that differs."""
        finite = [a for a in self.arrays if a.rel != float("inf")]
        return max(finite, key=lambda a: a.rel) if finite else (self.arrays[0] if self.arrays else None)

    def names(self) -> list[str]:
        """Every differing entry: arrays, JSON paths, RNG states."""
        return [a.name for a in self.arrays] + self.json_paths + self.rngs

    def describe(self) -> str:
        if self.rel_l2 is not None:
            return f"model parameters differ by {self.rel_l2:.3g} (relative L2 over {self.model_arrays} arrays)"
        parts = []
        if self.equal:
            parts.append(f"{self.compared} arrays, every JSON entry and every RNG state bitwise equal")
        if self.arrays:
            worst = self.worst
            assert worst is not None
            listed = ", ".join(a.name if a.why == "values" else f"{a.name} ({a.why})" for a in self.arrays)
            parts.append(
                f"{len(self.arrays)} of {self.compared} arrays differ (most: {worst.name}, rel {worst.rel:.3g}): {listed}"
            )
        if self.json_paths:
            entries = "entry differs" if len(self.json_paths) == 1 else "entries differ"
            parts.append(f"{len(self.json_paths)} JSON {entries}: {', '.join(self.json_paths)}")
        if self.rngs:
            parts.append(f"RNG states differ: {', '.join(self.rngs)}")
        if self.unused_rngs:
            parts.append(f"not compared, never drawn from in either run: {', '.join(self.unused_rngs)}")
        return "; ".join(parts)


def diff_final(
    reference: Path, faulty: Path, step: int, exact: bool, unused: frozenset[tuple[str, str]] = frozenset()
) -> FinalDiff:
    """Compare the snapshots of ``step`` of two runs.

    ``exact``: every array, JSON entry and RNG state, bit for bit, except the generators in
    ``unused`` (``("rank1", "numpy")``, as `unused_generators` finds them). Otherwise (another
    placement, which keeps its own RNG streams per rank) the training state without the RNGs, and
    the model parameters' relative L2 distance.
    """
    with Checkpointer(str(reference), local=True) as a, Checkpointer(str(faulty), local=True) as b:
        ra, rb = a.open_snapshot(step), b.open_snapshot(step)
        objects_a, objects_b = ra.manifest.objects, rb.manifest.objects
        rng_keys = sorted(k for k in set(objects_a) & set(objects_b) if _rank_of_rng(k) is not None) if exact else []
        rng_arrays = {n for k in rng_keys for o in (objects_a[k], objects_b[k]) for n in tree.tensor_refs(o.tree)}

        def kept(names: list[str]) -> set[str]:
            return {n for n in names if not n.startswith(RNG_KEY)}

        in_a, in_b = kept(list(ra.manifest.arrays)), kept(list(rb.manifest.arrays))
        both = sorted(in_a & in_b)
        xs = ra.read_arrays(both + sorted(rng_arrays & set(ra.manifest.arrays)))
        ys = rb.read_arrays(both + sorted(rng_arrays & set(rb.manifest.arrays)))
    out = FinalDiff(compared=len(in_a | in_b))
    out.arrays += [ArrayDiff(n, float("inf"), "only in reference") for n in sorted(in_a - in_b)]
    out.arrays += [ArrayDiff(n, float("inf"), "only in faulty run") for n in sorted(in_b - in_a)]
    for name in both:
        found = _array_diff(name, xs[name], ys[name])
        if found is not None:
            out.arrays.append(found)
    out.arrays.sort(key=lambda d: d.name)
    for key in sorted(set(objects_a) | set(objects_b)):
        if key.startswith(RNG_KEY) and (not exact or key in rng_keys):
            continue  # compared generator by generator below (or not at all on another placement)
        if key not in objects_a or key not in objects_b:
            out.json_paths.append(f"{key} (only in {'reference' if key in objects_a else 'faulty run'})")
            continue
        out.json_paths += tree_differences(objects_a[key].tree, objects_b[key].tree, sanitize_segment(key))
    for key in rng_keys:
        generators_a = _generators(tree.decode(objects_a[key].tree, xs))
        generators_b = _generators(tree.decode(objects_b[key].tree, ys))
        rank = f"rank{_rank_of_rng(key)}"
        for gen in sorted(set(generators_a) | set(generators_b)):
            if _same_value(generators_a.get(gen), generators_b.get(gen)):
                continue
            (out.unused_rngs if (rank, gen) in unused else out.rngs).append(f"{key}/{gen}")
    if not exact:
        modules = {sanitize_segment(k) for k, o in objects_a.items() if o.kind == "module"}
        params = [n for n in both if n.split("/", 1)[0] in modules]
        diff = sum(float((xs[n].double() - ys[n].double()).square().sum()) for n in params)
        norm = sum(float(xs[n].double().square().sum()) for n in params) or 1.0
        out.rel_l2, out.model_arrays = (diff / norm) ** 0.5, len(params)
    return out


def _rank_of_rng(key: str) -> int | None:
    """The rank whose global RNG state the snapshot entry ``key`` holds (``_rng``, ``_rng.<rank>``)."""
    if key == RNG_KEY:
        return 0
    prefix, _, rank = key.partition(".")
    return int(rank) if prefix == RNG_KEY and rank.isdigit() else None


def _generators(state: Any) -> dict[str, Any]:
    """A `moai_ckpt.rng.GlobalRNG` state by generator, named as log records name them."""
    if not isinstance(state, dict):
        return {}
    out = {name: state[name] for name in ("torch_cpu", "numpy", "python") if name in state}
    for i, cuda in enumerate(state.get("cuda") or []):
        out[f"cuda:{i}"] = cuda
    for name, gen in (state.get("generators") or {}).items():
        out[f"gen:{name}"] = gen
    return out


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and _same_bits(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def unused_generators(*run_dirs: Path) -> frozenset[tuple[str, str]]:
    """(rank, generator) pairs whose logged state at step start never changed, in every run given:
    generators the job never draws from (a difference in their state changes nothing)."""
    unused: set[tuple[str, str]] | None = None
    for run_dir in run_dirs:
        with Checkpointer(str(run_dir), local=True) as ckpt:
            records = list(history(ckpt.storage).values())
        states: dict[tuple[str, str], set[str]] = {}
        for record in records:
            for rank, generators in record.rng.items():
                for gen, digest in generators.items():
                    states.setdefault((rank, gen), set()).add(digest)
        static = {key for key, seen in states.items() if len(seen) == 1} if len(records) > 1 else set()
        unused = static if unused is None else unused & static
    return frozenset(unused or ())


def _array_diff(name: str, x: torch.Tensor, y: torch.Tensor) -> ArrayDiff | None:
    if x.shape != y.shape:
        return ArrayDiff(name, float("inf"), "shape")
    if x.dtype != y.dtype:
        return ArrayDiff(name, float("inf"), "dtype")
    if torch.equal(x, y) and _same_bits(x, y):
        return None
    if not x.is_floating_point():
        return ArrayDiff(name, float("inf"))
    scale = float(x.double().abs().max()) or 1.0
    return ArrayDiff(name, float((x.double() - y.double()).abs().max()) / scale)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``torch.equal`` treats -0.0 as 0.0 and NaN as unequal: compare the bytes too."""
    if not x.is_floating_point():
        return True
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (x, y)]
    return torch.equal(*as_bytes)


def tree_differences(a: Any, b: Any, path: str) -> list[str]:
    """Paths of the leaves that differ between two encoded JSON trees (a list of plain values, such
    as an RNG's state words, counts as one leaf)."""
    a, b = _untagged(a), _untagged(b)
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}/{key}")
            else:
                out += tree_differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(v, dict | list) for v in a):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in tree_differences(x, y, f"{path}/{i}")]
    return [] if a == b else [path]


def _untagged(node: Any) -> Any:
    """A tuple or a dict with non-string keys as `moai_ckpt.tree` encodes them, seen as a list or dict."""
    if isinstance(node, dict) and len(node) == 1:
        tag, value = next(iter(node.items()))
        if tag == "$tuple":
            return value
        if tag == "$dict" and isinstance(value, list):
            return {str(pair[0]): pair[1] for pair in value if isinstance(pair, list) and len(pair) == 2}
    return node


@dataclass
class StartCheck:
    """Whether two runs of a job agree on the first step they logged."""

    reproducible: bool
    detail: str
    inputs: list[str] = field(default_factory=list)  # step 1's inputs that differ
    advice: list[str] = field(default_factory=list)  # what to seed


def first_step(reference: Path, faulty: Path, unused: frozenset[tuple[str, str]] = frozenset()) -> StartCheck:
    """Compare step 1's logged inputs (then its results) between two runs of one job.

    Generators in ``unused`` (never drawn from: `unused_generators`) may differ: they change nothing.
    """
    with Checkpointer(str(reference), local=True) as a, Checkpointer(str(faulty), local=True) as b:
        ref, got = history(a.storage).get(1), history(b.storage).get(1)
    if ref is None or got is None:
        missing = "the reference's" if ref is None else "the faulty run's"
        return StartCheck(True, f"unverifiable: {missing} record of step 1 is gone")
    inputs, advice = differing_inputs(ref, got, unused)
    if inputs:
        return StartCheck(
            False,
            "the job is not reproducible from its start: the reference and the faulty run already differ in "
            f"step 1's logged inputs ({'; '.join(inputs)}), before any fault, so the final state cannot match "
            f"whatever moai-ckpt does. Seed {'; '.join(advice)}. {_WHERE}.",
            inputs,
            advice,
        )
    results = [
        name
        for name in ("loss", "grad_norm", "state")
        if getattr(ref.digests, name) is not None and getattr(ref.digests, name) != getattr(got.digests, name)
    ]
    if results:
        return StartCheck(
            False,
            f"step 1's inputs are equal but its results differ ({', '.join(results)}): the job starts from another "
            "state in each run (a model or optimizer built before its seed is set, or from data read at start), or "
            "its first step is not deterministic (fault_tolerant(deterministic=True))",
            [f"results: {', '.join(results)}"],
        )
    return StartCheck(True, "step 1's logged inputs and results equal the reference's")


def differing_inputs(
    ref: StepRecord, got: StepRecord, unused: frozenset[tuple[str, str]] = frozenset()
) -> tuple[list[str], list[str]]:
    """(what differs among a step's logged inputs, what to seed for each generator that differs);
    generators in ``unused`` are not counted."""
    inputs: list[str] = []
    by_generator: dict[str, list[str]] = {}
    for rank in sorted(set(ref.rng) | set(got.rng)):
        mine, theirs = ref.rng.get(rank, {}), got.rng.get(rank, {})
        for gen in sorted(set(mine) | set(theirs)):
            if mine.get(gen) != theirs.get(gen) and (rank, gen) not in unused:
                by_generator.setdefault(gen, []).append(rank)
    for gen, ranks in by_generator.items():
        inputs.append(f"RNG state of {gen} on {', '.join(ranks)}")
    advice = list(dict.fromkeys(_SEED_ADVICE.get(gen.split(":", 1)[0], f"the generator {gen}") for gen in by_generator))
    if ref.samples != got.samples:
        inputs.append("the global batch's sample indices")
        advice.append("the data order: run.sampler(..., seed=...) with a fixed seed and dataset size")
    if ref.batch != got.batch:
        inputs.append("the batch's content")
        advice.append("the data source's shuffling and augmentation")
    changed = sorted(k for k in set(ref.hparams) | set(got.hparams) if ref.hparams.get(k) != got.hparams.get(k))
    if changed:
        inputs.append(f"hyperparameters {changed}")
        advice.append("nothing: make the hyperparameters in force at step 1 not depend on the process (time, host)")
    return inputs, advice
