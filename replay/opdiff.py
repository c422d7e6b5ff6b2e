"""Comparing two op captures of one step: the first op whose inputs agree but whose outputs differ.

The streams are aligned on op signatures (op name, input dtypes and shapes) with difflib, so an op
computed another way in one run (a matmul cast to bfloat16 and back: three ops for one) shows as
a *block* of one run against a block of the other. Walking the alignment in order, each aligned
op compares the hashes of its inputs (each value's hash comes from its producer, or, for an
external, from the capture itself) and of its outputs:

- inputs agree, outputs differ: the op itself diverged (``kind="op"``: non-determinism, another
  kernel, another precision);
- a replaced block whose inputs from outside the block agree and whose last outputs differ
  (``kind="block"``);
- an external input that differs between the runs (``kind="input"``: another batch, another
  parameter value, another kept constant).

The first of these is the divergence; every later op whose inputs agree but whose outputs differ
is another independent source (a second non-deterministic op), summarized with how far the rest
of the step moved. Errors are measured on each value's sample (`replay.ops.SAMPLE` elements, or
all of them for small values) and on its float64 norm.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from replay.ops import OpStream, sample_values


class ValueDiff(BaseModel):
    """One output of a divergent op in both runs."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    dtype_a: str
    dtype_b: str
    max_abs: float | None = None
    max_rel: float | None = None
    norm_rel: float | None = None
    sampled: int = Field(default=0, description="elements the errors are measured over")
    numel: int = 0


class Divergence(BaseModel):
    """Where two streams part: an op, a block of ops, or an external input."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="op | block | input")
    a_index: int
    b_index: int
    a_ops: list[str]
    b_ops: list[str]
    phase: str = ""
    input_shapes: list[list[int]] = Field(default_factory=list)
    input_dtypes: list[str] = Field(default_factory=list)
    b_input_dtypes: list[str] = Field(default_factory=list)
    source: str | None = Field(default=None, description="the external that differs (kind input)")
    outputs: list[ValueDiff] = Field(default_factory=list)

    @property
    def op(self) -> str:
        return self.a_ops[0] if self.a_ops else self.b_ops[0]

    def describe(self) -> str:
        where = f"A #{self.a_index} / B #{self.b_index}"
        if self.kind == "input":
            return f"{where}: external input {self.source} differs (read by {self.op})"
        head = self.op if self.kind == "op" else f"{' + '.join(self.a_ops)} in A, {' + '.join(self.b_ops)} in B"
        err = self.outputs[0] if self.outputs else None
        errors = ""
        if err is not None and err.max_abs is not None:
            errors = (
                f"; max abs error {err.max_abs:.3g}, max rel error {err.max_rel:.3g} "
                f"(over {err.sampled} of {err.numel} elements), norm rel {err.norm_rel:.3g}"
            )
        if self.kind == "block" and self.b_input_dtypes != self.input_dtypes:
            errors += f"; B's ops read {sorted(set(self.b_input_dtypes))}"
        shapes = " x ".join(str(tuple(s)) for s in self.input_shapes)
        return (
            f"{where} [{self.phase}] {head}: inputs agree, outputs differ; inputs {shapes} {self.input_dtypes}{errors}"
        )


class DiffReport(BaseModel):
    """`diff_streams`' answer."""

    model_config = ConfigDict(extra="forbid")

    step_a: int
    step_b: int
    label_a: str = ""
    label_b: str = ""
    device_a: str = ""
    device_b: str = ""
    ops_a: int
    ops_b: int
    aligned: int
    unaligned_a: int
    unaligned_b: int
    identical: bool
    first: Divergence | None = None
    independent: list[Divergence] = Field(
        default_factory=list, description="later ops whose inputs agree but outputs differ"
    )
    later_diverged: int = Field(default=0, description="aligned ops after the first divergence whose outputs differ")
    later_aligned: int = 0
    worst_op: str | None = None
    worst_norm_rel: float | None = None
    results: dict[str, list[float | None]] = Field(
        default_factory=dict, description="loss / grad_norm: [A, B, rel] (values taken from the sample)"
    )
    params_max_norm_rel: float | None = None
    params_worst: str | None = None


def _scalars(node: Any) -> Any:
    """The argument tree with tensors blanked (what must agree besides input values)."""
    if isinstance(node, dict):
        return None if "t" in node and len(node) == 1 else {k: _scalars(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_scalars(v) for v in node]
    return node


def _signature(stream: OpStream, op: dict[str, Any]) -> str:
    inputs = [stream.values[v] for v in stream.input_vids(op)]
    return op["op"] + "|" + ";".join(f"{m['dtype']}{m['shape']}" for m in inputs)


def _hash(stream: OpStream, vid: int) -> str | None:
    return stream.values[vid].get("hash")


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), 1e-30)


def value_diff(a: dict[str, Any], b: dict[str, Any]) -> ValueDiff:
    """How far value ``b`` is from value ``a`` (over their samples, and by norm)."""
    out = ValueDiff(shape=a["shape"], dtype_a=a["dtype"], dtype_b=b["dtype"], numel=math.prod(a["shape"]))
    out.norm_rel = _rel(a.get("norm"), b.get("norm"))
    if a["shape"] != b["shape"]:
        return out
    xs, ys = sample_values(a), sample_values(b)
    if xs and len(xs) == len(ys):
        diffs = [abs(x - y) for x, y in zip(xs, ys, strict=True)]
        out.max_abs = max(diffs)
        rels = [d / abs(x) for d, x in zip(diffs, xs, strict=True) if x != 0 and not math.isnan(d)]
        out.max_rel = max(rels, default=0.0 if out.max_abs == 0 else math.inf)
        out.sampled = len(xs)
    return out


class _Walk:
    def __init__(self, a: OpStream, b: OpStream, loose_a: set[int], loose_b: set[int]) -> None:
        self.a, self.b = a, b
        self.loose = {id(a): loose_a, id(b): loose_b}  # op indices outside the aligned runs
        self.events: list[Divergence] = []
        self.diverged_after: list[tuple[int, float | None, str]] = []  # (a index, norm rel, op)
        self.seen_inputs: set[str] = set()
        self.aligned_a: list[int] = []

    def pair(self, i: int, j: int) -> None:
        a, b = self.a, self.b
        self.aligned_a.append(i)
        oa, ob = a.ops[i], b.ops[j]
        ins_a, ins_b = a.input_vids(oa), b.input_vids(ob)
        outs_a, outs_b = a.output_vids(oa), b.output_vids(ob)
        for va, vb in zip(ins_a, ins_b, strict=False):
            src = a.externals.get(va)
            if src is not None and vb in b.externals and _hash(a, va) != _hash(b, vb) and src not in self.seen_inputs:
                self.seen_inputs.add(src)
                self.events.append(self._event("input", i, j, [oa["op"]], [ob["op"]], ins_a, ins_b, [], [], src))
        same_in = [_hash(a, v) for v in ins_a] == [_hash(b, v) for v in ins_b]
        same_in = same_in and _scalars((oa["a"], oa["k"])) == _scalars((ob["a"], ob["k"]))
        same_out = [_hash(a, v) for v in outs_a] == [_hash(b, v) for v in outs_b]
        if not same_out:
            norms = [value_diff(a.values[x], b.values[y]).norm_rel or 0.0 for x, y in zip(outs_a, outs_b, strict=False)]
            norm = max(norms, default=None)
            self.diverged_after.append((i, norm, oa["op"]))
            if same_in:
                self.events.append(self._event("op", i, j, [oa["op"]], [ob["op"]], ins_a, ins_b, outs_a, outs_b))

    def block(self, i1: int, i2: int, j1: int, j2: int) -> None:
        a, b = self.a, self.b
        if i1 == i2 or j1 == j2:
            return  # ops only one run has: no outputs to compare
        direct_a, direct_b = self._block_inputs(a, i1, i2), self._block_inputs(b, j1, j2)
        roots_a, roots_b = self._roots(a, direct_a), self._roots(b, direct_b)
        outs_a, outs_b = a.output_vids(a.ops[i2 - 1]), b.output_vids(b.ops[j2 - 1])
        if sorted(_hash(a, v) or "" for v in roots_a) != sorted(_hash(b, v) or "" for v in roots_b):
            return  # the block's inputs (traced back through unaligned casts) differ: not its fault
        if [_hash(a, v) for v in outs_a] != [_hash(b, v) for v in outs_b]:
            ops_a = [op["op"] for op in a.ops[i1:i2]]
            ops_b = [op["op"] for op in b.ops[j1:j2]]
            self.events.append(self._event("block", i1, j1, ops_a, ops_b, direct_a, direct_b, outs_a, outs_b))

    def _roots(self, s: OpStream, vids: list[int]) -> list[int]:
        """Inputs traced back through unaligned producers (a cast inserted before the block)."""
        loose, out, todo, seen = self.loose[id(s)], [], list(vids), set()
        while todo:
            vid = todo.pop()
            if vid in seen:
                continue
            seen.add(vid)
            by = s.values[vid]["by"]
            if by >= 0 and by in loose:
                todo.extend(s.input_vids(s.ops[by]))
            else:
                out.append(vid)
        return out

    @staticmethod
    def _block_inputs(s: OpStream, lo: int, hi: int) -> list[int]:
        inside: set[int] = set()
        ext: list[int] = []
        for op in s.ops[lo:hi]:
            ext.extend(v for v in s.input_vids(op) if v not in inside and v not in ext)
            inside.update(s.output_vids(op))
        return ext

    def _event(
        self,
        kind: str,
        i: int,
        j: int,
        ops_a: list[str],
        ops_b: list[str],
        ins_a: list[int],
        ins_b: list[int],
        outs_a: list[int],
        outs_b: list[int],
        source: str | None = None,
    ) -> Divergence:
        a, b = self.a, self.b
        return Divergence(
            kind=kind,
            a_index=i,
            b_index=j,
            a_ops=ops_a,
            b_ops=ops_b,
            phase=a.ops[i].get("phase", ""),
            input_shapes=[a.values[v]["shape"] for v in ins_a],
            input_dtypes=[a.values[v]["dtype"] for v in ins_a],
            b_input_dtypes=[b.values[v]["dtype"] for v in ins_b],
            source=source,
            outputs=[value_diff(a.values[x], b.values[y]) for x, y in zip(outs_a, outs_b, strict=False)],
        )


def diff_streams(a: OpStream, b: OpStream) -> DiffReport:
    """Align two captures of a step and find where they part (see the module docstring)."""
    sig_a = [_signature(a, op) for op in a.ops]
    sig_b = [_signature(b, op) for op in b.ops]
    matcher = difflib.SequenceMatcher(None, sig_a, sig_b, autojunk=False)
    codes = matcher.get_opcodes()
    loose_a = {i for tag, i1, i2, _, _ in codes if tag != "equal" for i in range(i1, i2)}
    loose_b = {j for tag, _, _, j1, j2 in codes if tag != "equal" for j in range(j1, j2)}
    walk = _Walk(a, b, loose_a, loose_b)
    aligned = unaligned_a = unaligned_b = 0
    for tag, i1, i2, j1, j2 in codes:
        if tag == "equal":
            for k in range(i2 - i1):
                walk.pair(i1 + k, j1 + k)
            aligned += i2 - i1
        else:
            walk.block(i1, i2, j1, j2)
            unaligned_a += i2 - i1
            unaligned_b += j2 - j1
    events = sorted(walk.events, key=lambda e: (e.a_index, e.kind != "input"))
    first = events[0] if events else None
    report = DiffReport(
        step_a=a.step,
        step_b=b.step,
        label_a=str(a.meta.get("label", "")),
        label_b=str(b.meta.get("label", "")),
        device_a=_device(a),
        device_b=_device(b),
        ops_a=len(a.ops),
        ops_b=len(b.ops),
        aligned=aligned,
        unaligned_a=unaligned_a,
        unaligned_b=unaligned_b,
        # ops only one run has (a sampler's permutation drawn again after a restore) do not make
        # two steps differ; an aligned op whose outputs differ does
        identical=first is None and not walk.diverged_after,
        first=first,
        independent=[e for e in events[1:] if e.kind != "input"][:20],
    )
    if first is not None:
        later = [d for d in walk.diverged_after if d[0] > first.a_index]
        report.later_diverged = len(later)
        report.later_aligned = sum(1 for i in walk.aligned_a if i > first.a_index)
        worst = max(later, key=lambda d: d[1] or 0.0, default=None)
        if worst is not None:
            report.worst_op, report.worst_norm_rel = f"#{worst[0]} {worst[2]}", worst[1]
    _results(report, a, b)
    return report


def _device(s: OpStream) -> str:
    placement = s.meta.get("placement") or {}
    return str(placement.get("device_name") or placement.get("device_type") or "")


def _scalar(s: OpStream, ref: Any) -> float | None:
    if isinstance(ref, dict) and "f" in ref:
        return float.fromhex(ref["f"])
    if isinstance(ref, int) and 0 <= ref < len(s.values):
        sample = sample_values(s.values[ref])
        return sample[0] if sample else None
    return None


def _results(report: DiffReport, a: OpStream, b: OpStream) -> None:
    for name in ("loss", "grad_norm"):
        x, y = _scalar(a, a.results.get(name)), _scalar(b, b.results.get(name))
        if x is not None or y is not None:
            report.results[name] = [x, y, _rel(x, y)]
    worst, worst_rel = None, None
    for source, va in a.finals.items():
        vb = b.finals.get(source)
        if vb is None or not source.startswith("param/"):
            continue
        r = _rel(a.values[va].get("norm"), b.values[vb].get("norm"))
        if r is not None and (worst_rel is None or r > worst_rel):
            worst, worst_rel = source, r
    report.params_worst, report.params_max_norm_rel = worst, worst_rel
