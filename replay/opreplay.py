"""Code-free replay: re-execute captured steps from their op stream, without the user's code.

Starting from a snapshot, each captured step's ops are resolved by name in ``torch.ops.aten`` /
``torch.ops.prims`` (nothing else is ever called; nothing is evaluated or unpickled) and run on
one device of any type. Parameters and optimizer state come from the snapshot (or from the
previous replayed step, for consecutive captures); the kept values (batch, constants, random ops'
outputs) come from the capture, so random ops replay the original draws on any device. Every
output is hashed as at capture time, which names the first op whose inputs agree but whose
outputs differ, and the step's loss, grad norm and parameter norms are checked against the log.

Host values the step read from the device (``.item()``: ``aten._local_scalar_dense``) are
replayed as recorded in the later ops that use them; a replay that computes another value says so
(``host_drift``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.dtypes import torch_dtype
from moai_ckpt.errors import SnapshotNotFoundError
from moai_ckpt.tree import decode
from replay.check import StepCheck, compare, params_array
from replay.log import Digests, LogContents, Placement, StepRecord
from replay.opdiff import Divergence, value_diff
from replay.ops import COLLECTIVE_NAMESPACES, OpCaptureError, OpStream, decode_digest, digest, stored_from_snapshot

REPLAYABLE_NAMESPACES = ("aten", "prims")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# ops that reach outside tensors (files, the console): a capture read from storage never runs them
_OUTSIDE_TENSORS = frozenset({"from_file", "_print"})
_PATH_ARGUMENTS = frozenset({"filename", "path", "file"})


def resolve(name: str) -> Callable[..., Any]:
    """``aten.<op>.<overload>`` -> the `torch._ops.OpOverload`; any other namespace is refused."""
    parts = name.split(".")
    if len(parts) != 3 or not all(_NAME.match(p) for p in parts):
        raise OpCaptureError(f"op name {name!r} is not <namespace>.<op>.<overload>")
    namespace, op, overload = parts
    if namespace not in REPLAYABLE_NAMESPACES:
        raise OpCaptureError(
            f"op {name} is not an aten or prims op: a code-free replay runs only those "
            "(a custom op needs the code that defines it; replay the step with `moai-ckpt replay --verify`)"
        )
    try:
        resolved = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except AttributeError:
        raise OpCaptureError(f"this torch ({torch.__version__}) has no op {name}") from None
    schema = getattr(resolved, "_schema", None)
    takes_path = schema is not None and any(a.name in _PATH_ARGUMENTS for a in schema.arguments)
    if op in _OUTSIDE_TENSORS or takes_path:
        raise OpCaptureError(
            f"op {name} reaches outside tensors (files or the console): a capture read from storage never runs it"
        )
    return resolved


def check_replayable(stream: OpStream) -> None:
    """Refuse captures a single-device replay cannot reproduce (several ranks, collectives)."""
    collectives = sorted({op["op"] for op in stream.ops if op["op"].split(".", 1)[0] in COLLECTIVE_NAMESPACES})
    if stream.world_size > 1 or collectives:
        raise OpCaptureError(
            f"the capture of step {stream.step} comes from a run of {stream.world_size} ranks"
            + (f" (collectives: {', '.join(collectives[:3])})" if collectives else "")
            + ": code-free replay supports captures of single-process runs; replay a multi-rank run with "
            "`moai-ckpt replay URL --verify --world-size N`",
            step=stream.step,
        )
    for op in stream.ops:
        if not op.get("rng"):  # random ops replay their recorded draws
            resolve(op["op"])


class OpStepResult(BaseModel):
    """One replayed step."""

    model_config = ConfigDict(extra="forbid")

    step: int
    label: str
    ops: int
    device_captured: str
    device_replayed: str
    strict: bool = Field(description="same device type as the capture: must be bitwise equal")
    ops_differing: int = 0
    first: Divergence | None = None
    externals_differing: list[str] = Field(default_factory=list)
    host_drift: list[str] = Field(default_factory=list)
    check: StepCheck | None = None
    note: str | None = None
    saved_as: str | None = Field(default=None, description="label of this replay stored as a capture")
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.check is not None:
            return self.check.bitwise
        return self.ops_differing == 0


class OpReplayReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    device: str
    base_step: int | None = None
    steps: list[OpStepResult] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(s.strict and not s.ok for s in self.steps)


# -- the state: snapshot entries by source key ------------------------------------------------------


class _Path(str):
    """An array path standing for its tensor (``numpy()`` keeps it, for ``$ndarray`` entries)."""

    def numpy(self) -> _Path:
        return self


class _Paths(Mapping[str, Any]):
    """Resolves ``{"$tensor": path}`` to the path itself, so a tree decodes without reading arrays."""

    def __getitem__(self, key: str) -> str:
        return _Path(key)

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def snapshot_sources(ckpt: Checkpointer, step: int) -> tuple[Any, dict[str, str]]:
    """(reader, source key -> array path) of every parameter, optimizer state and tensor entry."""
    try:
        reader = ckpt.open_snapshot(step)
    except SnapshotNotFoundError:
        raise
    sources: dict[str, str] = {}
    for entry, record in reader.manifest.objects.items():
        tree = decode(record.tree, _Paths())
        if record.kind == "module" and isinstance(tree, dict):
            for key, path in tree.items():
                if isinstance(path, str):
                    sources[f"param/{entry}/{key}"] = path
        elif record.kind == "optimizer" and isinstance(tree, dict):
            for index, state in (tree.get("state") or {}).items():
                for key, path in (state or {}).items():
                    if isinstance(path, str) and path in reader.arrays:
                        sources[f"optim/{entry}/{index}/{key}"] = path
        elif record.kind == "tensor" and isinstance(tree, str):
            sources[f"state/{entry}"] = tree
    return reader, sources


def load_state(ckpt: Checkpointer, step: int, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The snapshot's tensors for the ``wanted`` source keys (missing keys are left out)."""
    reader, sources = snapshot_sources(ckpt, step)
    paths = {key: sources[key] for key in wanted if key in sources}
    arrays = reader.read_arrays(sorted(set(paths.values())))
    return {key: arrays[path] for key, path in paths.items()}


# -- running one stream ----------------------------------------------------------------------------


class OpReplayer:
    """Re-executes one captured step on ``device`` from ``state`` (source key -> tensor), in place.

    After `run`, ``state`` holds the step's final parameters and optimizer state.
    """

    def __init__(self, stream: OpStream, device: torch.device, state: dict[str, torch.Tensor]) -> None:
        check_replayable(stream)
        self.stream = stream
        self.device = device
        self.state = state
        self.env: dict[int, Any] = {}
        self.digests: dict[int, torch.Tensor] = {}
        self.host_drift: list[str] = []
        self.replayed: dict[int, dict[str, Any]] = {}  # value id -> its metadata with this replay's digest

    def _device(self, name: str) -> torch.device:
        return torch.device("cpu") if name == "cpu" or self.device.type == "cpu" else self.device

    def _decode(self, node: Any) -> Any:
        if node is None or isinstance(node, bool | int | str):
            return node
        if isinstance(node, list):
            return [self._decode(v) for v in node]
        if len(node) == 1:
            tag, value = next(iter(node.items()))
            if tag == "t":
                return self.env[value]
            if tag == "f":
                return float.fromhex(value)
            if tag == "dtype":
                return torch_dtype(value)
            if tag == "device":
                return self._device(value)
            if tag in ("layout", "memory_format"):
                found = getattr(torch, value, None) if _NAME.match(value) else None
                if not isinstance(found, torch.layout | torch.memory_format):
                    raise OpCaptureError(f"unknown {tag} {value!r} in the capture")
                return found
            if tag == "generator":
                return None
            if tag == "complex":
                return complex(float.fromhex(value[0]), float.fromhex(value[1]))
            if tag == "unsupported":
                raise OpCaptureError(f"an argument of type {value} was captured; it cannot be replayed")
        raise OpCaptureError(f"unexpected encoded argument {node!r}")

    def _place(self, vid: int, value: torch.Tensor) -> torch.Tensor:
        meta = self.stream.values[vid]
        device = self._device(meta["device"])
        if list(value.shape) != meta["shape"] or str(value.dtype).removeprefix("torch.") != meta["dtype"]:
            raise OpCaptureError(
                f"{self.stream.externals.get(vid, 'value')} is {tuple(value.shape)} {value.dtype}; the capture "
                f"read {tuple(meta['shape'])} {meta['dtype']}",
                step=self.stream.step,
            )
        stride = meta.get("stride")
        if stride is not None and list(value.stride()) != stride:
            try:
                out = torch.empty_strided(meta["shape"], stride, dtype=value.dtype, device=device)
                out.copy_(value)
                return out
            except RuntimeError:
                pass  # overlapping strides (an expanded tensor): a dense copy computes the same values
        return value.to(device)

    def _externals(self) -> list[str]:
        missing = []
        for vid, source in sorted(self.stream.externals.items()):
            if stored_from_snapshot(source):
                value = self.state.get(source)
                if value is None:
                    missing.append(source)
                    continue
                placed = self._place(vid, value)
                self.state[source] = placed  # the replay updates this very tensor in place
                self.env[vid] = placed
            else:
                self.env[vid] = self._place(vid, self.stream.blobs[vid])
            self.digests[vid] = digest(self.env[vid])
        return missing

    def run(self) -> None:
        missing = self._externals()
        if missing:
            raise OpCaptureError(
                f"step {self.stream.step} reads {', '.join(missing[:3])} that the snapshot does not hold",
                step=self.stream.step,
            )
        with torch.no_grad():
            for index, op in enumerate(self.stream.ops):
                self._run_op(index, op)

    def _run_op(self, index: int, op: dict[str, Any]) -> None:
        blobs = self.stream.blobs
        if op.get("rng"):  # the original draws, on any device
            for old, new in op["m"]:
                self.env[old].copy_(blobs[new].to(self.env[old].device))
                self.env[new] = self.env[old]
            for vid in _refs(op["o"]):
                if vid not in self.env:
                    self.env[vid] = self._place(vid, blobs[vid])
        else:
            fn = resolve(op["op"])
            out = fn(*self._decode(op["a"]), **{k: self._decode(v) for k, v in op["k"].items()})
            for old, new in op["m"]:
                self.env[new] = self.env[old]
            self._bind(op["o"], out, index)
        for vid in [*_refs(op["o"]), *(new for _, new in op["m"])]:
            value = self.env.get(vid)
            hashed = "hash" in self.stream.values[vid]
            if hashed and isinstance(value, torch.Tensor) and vid not in self.digests and value.layout == torch.strided:
                self.digests[vid] = digest(value)

    def _bind(self, encoded: Any, value: Any, index: int) -> None:
        if isinstance(encoded, dict) and set(encoded) == {"t"}:
            self.env[encoded["t"]] = value
        elif isinstance(encoded, list) and isinstance(value, list | tuple):
            for e, v in zip(encoded, value, strict=False):
                self._bind(e, v, index)
        elif encoded is not None and not isinstance(value, torch.Tensor):
            recorded = self._decode(encoded)
            if recorded != value and not (
                isinstance(value, float) and isinstance(recorded, float) and math.isnan(value) and math.isnan(recorded)
            ):
                self.host_drift.append(f"#{index} {self.stream.ops[index]['op']}: {recorded!r} recorded, {value!r} now")

    def compare(self) -> tuple[int, Divergence | None, list[str]]:
        """(ops whose outputs differ, the first whose inputs agree, externals that differ)."""
        words = _read(self.digests)
        replayed: dict[int, dict[str, Any]] = {}
        for vid, w in words.items():
            h, norm, sample = decode_digest(w)
            replayed[vid] = {**self.stream.values[vid], "hash": h, "norm": norm, "sample": sample}
        self.replayed = replayed
        externals = [src for vid, src in sorted(self.stream.externals.items()) if not _same(self.stream, replayed, vid)]
        differing, first = 0, None
        for index, op in enumerate(self.stream.ops):
            outs = self.stream.output_vids(op)
            if all(_same(self.stream, replayed, v) for v in outs):
                continue
            differing += 1
            ins = self.stream.input_vids(op)
            if first is None and all(_same(self.stream, replayed, v) for v in ins):
                first = Divergence(
                    kind="op",
                    a_index=index,
                    b_index=index,
                    a_ops=[op["op"]],
                    b_ops=[op["op"]],
                    phase=op.get("phase", ""),
                    input_shapes=[self.stream.values[v]["shape"] for v in ins],
                    input_dtypes=[self.stream.values[v]["dtype"] for v in ins],
                    b_input_dtypes=[self.stream.values[v]["dtype"] for v in ins],
                    outputs=[value_diff(self.stream.values[v], replayed[v]) for v in outs if v in replayed],
                )
        return differing, first, externals

    def as_capture(self) -> OpStream:
        """This replay as a capture of its own: the same ops, with the digests computed here."""
        values = [self.replayed.get(vid, meta) for vid, meta in enumerate(self.stream.values)]
        device = str(self.device)
        values = [{**m, "device": "cpu" if m["device"] == "cpu" else device} for m in values]
        return OpStream(
            step=self.stream.step,
            rank=self.stream.rank,
            world_size=self.stream.world_size,
            meta={**self.stream.meta, "replay_of": self.stream.meta.get("label")},
            ops=self.stream.ops,
            values=values,
            externals=self.stream.externals,
            results=self.stream.results,
            finals=self.stream.finals,
            blobs=self.stream.blobs,
        )

    def results(self) -> tuple[float | None, float | None]:
        out: list[float | None] = []
        for name in ("loss", "grad_norm"):
            ref = self.stream.results.get(name)
            if isinstance(ref, int) and isinstance(self.env.get(ref), torch.Tensor):
                out.append(float(self.env[ref].detach().reshape(()).to(torch.float32)))
            elif isinstance(ref, dict) and "f" in ref:
                out.append(float.fromhex(ref["f"]))
            else:
                out.append(None)
        return out[0], out[1]


def _refs(node: Any) -> list[int]:
    from replay.ops import value_refs

    return list(value_refs(node))


def _same(stream: OpStream, replayed: dict[int, dict[str, Any]], vid: int) -> bool:
    new, old = replayed.get(vid), stream.values[vid].get("hash")
    return new is None or old is None or new["hash"] == old


def _read(digests: dict[int, torch.Tensor]) -> dict[int, list[int]]:
    by_device: dict[str, list[int]] = {}
    for vid, d in digests.items():
        by_device.setdefault(str(d.device), []).append(vid)
    out: dict[int, list[int]] = {}
    for vids in by_device.values():
        flat = torch.cat([digests[v] for v in vids]).cpu().tolist()
        offset = 0
        for v in vids:
            n = digests[v].numel()
            out[v] = flat[offset : offset + n]
            offset += n
    return out


# -- checking a replayed step against the log ---------------------------------------------------------


def param_names(contents: LogContents, step: int) -> list[str]:
    """The log's parameter names (``<entry>.<fqn>``, in the order of the per-parameter norms)."""
    import json

    header = contents.headers.get(step)
    if header is None or not header.params or header.params not in contents.blobs:
        return []
    names = json.loads(contents.blobs[header.params])
    return [str(n) for n in names]


def check_step(replayer: OpReplayer, record: StepRecord, contents: LogContents) -> StepCheck:
    """The replayed step's digests (as `replay.stepstate.StepValues` computes them) against its record."""
    names = param_names(contents, record.step)
    tensors = []
    for name in names:
        entry, _, fqn = name.partition(".")
        tensor = replayer.state.get(f"param/{entry}/{fqn}")
        if tensor is None:
            names = []
            break
        tensors.append(tensor)
    params = [float(x) for x in torch._foreach_norm(tensors, 2, dtype=torch.float32)] if names else []
    loss, grad_norm = replayer.results()
    replayed = record.model_copy(
        update={
            "digests": Digests(
                loss=loss,
                grad_norm=grad_norm if record.digests.grad_norm is not None else None,
                state=float.hex(math.sqrt(math.fsum(p * p for p in params))) if params else None,
                params=record.digests.params,
            )
        }
    )
    logged_params = params_array(contents.blobs.get(record.digests.params or ""))
    return compare(record, replayed, logged_params, params, names)


def replay_stream(
    stream: OpStream,
    device: torch.device,
    state: dict[str, torch.Tensor],
    record: StepRecord | None,
    contents: LogContents | None,
) -> tuple[OpStepResult, OpReplayer]:
    """Replay one step and compare it with its capture and its log record."""
    started = time.perf_counter()
    replayer = OpReplayer(stream, device, state)
    threads = torch.get_num_threads()
    captured_threads = stream.meta.get("threads")
    if device.type == "cpu" and isinstance(captured_threads, int) and captured_threads > 0:
        torch.set_num_threads(captured_threads)  # CPU reductions split by thread count: replay as captured
    try:
        replayer.run()
    finally:
        torch.set_num_threads(threads)
    differing, first, externals = replayer.compare()
    captured = stream.meta.get("placement", {})
    captured_type = str(captured.get("device_type", "cpu"))
    result = OpStepResult(
        step=stream.step,
        label=str(stream.meta.get("label", "")),
        ops=len(stream.ops),
        device_captured=str(captured.get("device_name") or captured_type),
        device_replayed=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        strict=captured_type == device.type,
        ops_differing=differing,
        first=first,
        externals_differing=externals,
        host_drift=replayer.host_drift[:10],
    )
    if record is not None and contents is not None:
        result.check = check_step(replayer, record, contents)
    else:
        result.note = "the log holds no record of this step: checked against the capture only"
    result.seconds = time.perf_counter() - started
    return result, replayer


# -- several steps, from the snapshots --------------------------------------------------------------


def replay_captures(
    ckpt: Checkpointer, device: torch.device, captures: dict[int, str], *, save: Placement | None = None
) -> OpReplayReport:
    """Replay the captures ``step -> label`` in step order, each from the snapshot just before it or
    from the replayed state of the step before it (consecutive captures).

    With ``save`` (the placement replayed on), each replayed step is also stored as a capture of its
    own (label ``c<ms>-ops-<device type>``), for ``diff-ops`` against the original.
    """
    from replay.log import records_after
    from replay.opstore import read_capture

    report = OpReplayReport(url=ckpt.url, device=str(device))
    snapshots = set(ckpt.steps())
    state: dict[str, torch.Tensor] | None = None
    contents: LogContents | None = None
    previous: int | None = None
    for step in sorted(captures):
        stream = read_capture(ckpt.storage, step, captures[step])
        check_replayable(stream)
        if step - 1 in snapshots:
            _, sources = snapshot_sources(ckpt, step - 1)
            state = load_state(ckpt, step - 1, set(sources))
            contents = records_after(ckpt.storage, step - 1)
            report.base_step = step - 1 if report.base_step is None else report.base_step
        elif previous != step - 1 or state is None:
            report.skipped.append(
                f"step {step}: no snapshot at step {step - 1} and step {step - 1} was not replayed from a capture"
            )
            previous = None
            continue
        record = next((r for r in contents.records if r.step == step), None) if contents is not None else None
        result, replayer = replay_stream(stream, device, state, record, contents)
        for source, vid in stream.finals.items():
            if isinstance(replayer.env.get(vid), torch.Tensor):
                state[source] = replayer.env[vid]
        if save is not None:
            from replay.opstore import new_label, write_capture

            result.saved_as = new_label(f"ops-{device.type}")
            write_capture(ckpt.storage, replayer.as_capture(), result.saved_as, save)
        report.steps.append(result)
        previous = step
    return report
