"""Op-level capture: a training step's aten op stream, with tensor dataflow and output hashes.

`OpRecorder` is a TorchDispatchMode. Entered around one step (forward, backward, optimizer), it
sees every aten op the step runs, on the training thread and on autograd's threads alike (the
engine carries the dispatch mode stack over in its ThreadLocalState), and records for each op:

- the op (``aten.<name>.<overload>``) and its arguments, encoded as JSON: tensors as references to
  *values* (``{"t": vid}``), scalars exactly (floats as ``float.hex``), dtypes, devices, layouts;
- the values it produced, and the values of arguments it wrote in place (a new value id for the
  same tensor: ``_foreach_add_`` on the parameters makes every parameter a new value);
- for every value: shape, dtype, device, strides and a digest computed on the device - an exact
  hash of the bytes (``hash``, int64 hex, position-weighted, so any changed element changes it),
  the float64 L2 norm (``norm``) and a fixed strided sample of up to ``sample`` elements as
  float64 (the max absolute and relative error of a diff is measured over it).

A tensor an op reads that no earlier captured op produced is an *external*, classified from the
objects the run tracks: ``param`` (module parameter, by FQN), ``buffer``, ``grad``, ``optim``
(optimizer state: entry, parameter index, key), ``batch`` (marked with `mark_batch`), or
``const``. Parameters and optimizer state come back from the snapshot in a code-free replay; the
bytes of every other external, and of every random op's output (ops tagged
``nondeterministic_seeded``: dropout masks, ``randn``...), are kept with the capture, so a replay
on another device type draws nothing itself.

Digests stay on the device until the step ends (one host copy per device then), so a captured step
costs extra kernels, not a device sync per op. Nothing is pickled: the capture is JSON plus raw
bytes (`replay.opstore`).
"""

from __future__ import annotations

import base64
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from moai_ckpt.errors import OpCaptureError

SAMPLE = 64  # elements of each value kept as float64 for error estimates
SKIPPED_NAMESPACES = ("profiler",)
# ops whose outputs are uninitialized memory: not hashed (their bytes mean nothing until written)
UNINITIALIZED = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
)  # record_function markers: no data, not replayable
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_dtensor")
_K1, _K2 = 0x9E3779B97F4A7C16, 0x2545F4914F6CDD1D  # even multiplier, odd offset: every weight is odd
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_active: OpRecorder | None = None
_active_lock = threading.Lock()


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# -- digests, on the device ------------------------------------------------------------------------


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its element size, in logical (not storage) order."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    target = _INT_OF_SIZE[t.element_size()]
    return t if t.dtype == target else t.view(target)


_positions: dict[tuple[int, int, str], torch.Tensor] = {}


def _sample_positions(n: int, k: int, device: torch.device) -> torch.Tensor:
    key = (n, k, str(device))
    found = _positions.get(key)
    if found is None:
        found = torch.linspace(0, n - 1, k, dtype=torch.float64).round().to(torch.int64).to(device)
        if len(_positions) > 4096:
            _positions.clear()
        _positions[key] = found
    return found


def digest(t: torch.Tensor, sample: int = SAMPLE) -> torch.Tensor:
    """``[hash, float64 norm bits, sampled float64 bits...]`` of ``t`` as one int64 tensor on its device.

    The hash is ``sum_i w_i * word_i`` in wrapping int64 with odd weights ``w_i = i * K1 + K2``:
    integer sums do not depend on the reduction order, so the same bytes hash the same on any
    device, and a change of any single element always changes it.
    """
    with torch.no_grad():
        n = t.numel()
        if n == 0:
            return torch.zeros(2, dtype=torch.int64, device=t.device)
        flat = _words(t).reshape(-1)
        weights = torch.arange(n, dtype=torch.int64, device=t.device)
        weights.mul_(_signed(_K1)).add_(_signed(_K2)).mul_(flat)
        h = weights.sum().reshape(1)
        values = t if t.is_floating_point() or t.is_complex() else t.to(torch.float64)
        norm = torch.linalg.vector_norm(values, dtype=torch.float64 if not t.is_complex() else None)
        norm = norm.to(torch.float64).reshape(1).view(torch.int64)
        k = min(sample, n)
        real = torch.view_as_real(t).select(-1, 0) if t.is_complex() else t
        picked = real.reshape(-1).index_select(0, _sample_positions(n, k, t.device)).to(torch.float64)
        return torch.cat([h, norm, picked.view(torch.int64)])


def decode_digest(words: list[int]) -> tuple[str, float, str]:
    """(hash as 16 hex digits, norm, sample as base64 of float64 LE) from `digest`'s words."""
    h = format(words[0] & ((1 << 64) - 1), "016x")
    norm = struct.unpack("<d", struct.pack("<q", words[1]))[0]
    sample = base64.b64encode(struct.pack(f"<{len(words) - 2}q", *words[2:])).decode()
    return h, norm, sample


def sample_values(meta: Mapping[str, Any]) -> list[float]:
    """The sampled elements of a value, as floats."""
    raw = base64.b64decode(meta.get("sample") or "")
    return list(struct.unpack(f"<{len(raw) // 8}d", raw))


# -- encoding arguments ----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from tensors_in(v)


# -- what the step's external tensors are ----------------------------------------------------------


def classify(tracked: Mapping[str, Any]) -> WeakTensorKeyDictionary:
    """tensor -> source key of every tensor the tracked objects hold at step start.

    Keys: ``param/<entry>/<fqn>``, ``grad/<entry>/<fqn>``, ``buffer/<entry>/<fqn>``,
    ``optim/<entry>/<param index>/<key>`` (the index `Optimizer.state_dict` gives the parameter),
    ``state/<entry>`` (a tracked tensor).
    """
    found = WeakTensorKeyDictionary()
    for name, obj in tracked.items():
        if isinstance(obj, torch.nn.Module):
            for fqn, p in obj.named_parameters():
                found.setdefault(p, f"param/{name}/{fqn}")
                if p.grad is not None:
                    found.setdefault(p.grad, f"grad/{name}/{fqn}")
            for fqn, b in obj.named_buffers():
                found.setdefault(b, f"buffer/{name}/{fqn}")
        elif isinstance(obj, torch.optim.Optimizer):
            for key, tensor in optimizer_state(name, obj):
                found.setdefault(tensor, key)
        elif isinstance(obj, torch.Tensor):
            found.setdefault(obj, f"state/{name}")
    return found


def optimizer_state(name: str, opt: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """(``optim/<name>/<index>/<key>``, tensor) of every tensor in the optimizer's state."""
    index: dict[int, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in index:
                index[id(p)] = len(index)
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    yield f"optim/{name}/{index[id(p)]}/{key}", value


def stored_from_snapshot(source: str) -> bool:
    """Whether an external of this source comes back from the snapshot (else its bytes are kept)."""
    return source.startswith(("param/", "optim/", "state/"))


# -- the capture ------------------------------------------------------------------------------------


@dataclass
class OpStream:
    """One rank's captured step: ops, values, externals, and the bytes a code-free replay needs.

    ``values[vid]`` = ``{"shape", "dtype", "device", "stride", "by": op index or -1 (external),
    "hash", "norm", "sample"}``; ``ops[i]`` = ``{"op", "a", "k", "o", "m", "phase"}`` with ``m`` the
    ``[old vid, new vid]`` pairs of arguments written in place, and ``"rng": true`` on random ops;
    ``externals`` = vid -> source key (see `classify`); ``results`` = ``loss``/``grad_norm`` ->
    vid (or a number); ``finals`` = source key -> vid of its value at step end; ``blobs`` = vid ->
    CPU tensor of each value kept with the capture.
    """

    step: int
    rank: int = 0
    world_size: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    ops: list[dict[str, Any]] = field(default_factory=list)
    values: list[dict[str, Any]] = field(default_factory=list)
    externals: dict[int, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    finals: dict[str, int] = field(default_factory=dict)
    blobs: dict[int, torch.Tensor] = field(default_factory=dict)

    def input_vids(self, op: dict[str, Any]) -> list[int]:
        return list(value_refs([op["a"], op["k"]]))

    def output_vids(self, op: dict[str, Any]) -> list[int]:
        outs = list(value_refs(op["o"]))
        return outs + [new for _, new in op["m"] if new not in outs]

    def namespaces(self) -> set[str]:
        return {op["op"].split(".", 1)[0] for op in self.ops}


def value_refs(node: Any) -> Iterator[int]:
    """Value ids referenced by an encoded argument tree, in order."""
    if isinstance(node, dict):
        if "t" in node and len(node) == 1:
            yield node["t"]
        else:
            for v in node.values():
                yield from value_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from value_refs(v)


class OpRecorder(TorchDispatchMode):
    """Record every aten op run while entered (see the module docstring).

    Args:
        step: the step being captured.
        tracked: the run's tracked objects (for classifying externals).
        sample: elements of each value kept for error estimates.
    """

    def __init__(
        self, step: int, tracked: Mapping[str, Any] | None = None, *, sample: int = SAMPLE, rank: int = 0
    ) -> None:
        super().__init__()
        self.stream = OpStream(step=step, rank=rank)
        self.tracked = dict(tracked or {})
        self.sample = sample
        self.sources = classify(self.tracked)
        self.ids = WeakTensorKeyDictionary()  # tensor -> its current value id
        self._digests: list[torch.Tensor] = []
        self._phase = "forward"
        self._lock = threading.Lock()
        self._started = 0.0

    # -- entering and leaving ---------------------------------------------------------------------

    def __enter__(self) -> OpRecorder:
        global _active
        with _active_lock:
            if _active is not None:
                raise OpCaptureError("an op capture is already running in this process")
            _active = self
        self._started = time.perf_counter()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        try:
            super().__exit__(*exc)
        finally:
            with _active_lock:
                _active = None

    def mark_batch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Classify ``tensors`` as the step's batch inputs (values kept with the capture)."""
        for t in tensors:
            if t not in self.ids:
                self.sources[t] = "batch"

    def set_phase(self, phase: str) -> None:
        """Label the ops recorded from now on (``forward``, ``backward``, ``optimizer``...)."""
        self._phase = phase

    # -- the dispatch hook ------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace in SKIPPED_NAMESPACES:
            return func(*args, **kwargs)
        with self._lock:  # autograd's threads and the training thread never interleave one op
            a = self._encode(args)
            k = {name: self._encode(v) for name, v in kwargs.items()}
            written = self._written(func, args, kwargs)
            out = func(*args, **kwargs)
            index = len(self.stream.ops)
            random = torch.Tag.nondeterministic_seeded in func.tags
            mutated: list[list[int]] = []
            renamed: dict[int, int] = {}
            for t in written:
                old = self.ids[t]
                new = self._new_value(t, index, keep=random)
                mutated.append([old, new])
                renamed[id(t)] = new
            record: dict[str, Any] = {
                "op": f"{func.namespace}.{func._opname}.{func._overloadname}",
                "a": a,
                "k": k,
                "o": self._encode_out(out, index, renamed, random, func._opname in UNINITIALIZED),
                "m": mutated,
                "phase": "backward" if torch._C._current_graph_task_id() != -1 else self._phase,
            }
            if random:
                record["rng"] = True
            self.stream.ops.append(record)
            return out

    def _written(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
            out.extend(t for t in tensors_in(value) if all(t is not o for o in out))
        return out

    def _encode(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {"t": self._vid_in(x)}
        if x is None or isinstance(x, bool | str | int):
            return x
        if isinstance(x, float):
            return {"f": x.hex()}
        if isinstance(x, list | tuple):
            return [self._encode(v) for v in x]
        if isinstance(x, torch.dtype):
            return {"dtype": _dtype_name(x)}
        if isinstance(x, torch.device):
            return {"device": str(x)}
        if isinstance(x, torch.layout):
            return {"layout": str(x).removeprefix("torch.")}
        if isinstance(x, torch.memory_format):
            return {"memory_format": str(x).removeprefix("torch.")}
        if isinstance(x, torch.Generator):
            return {"generator": x.device.type}
        if isinstance(x, complex):
            return {"complex": [x.real.hex(), x.imag.hex()]}
        return {"unsupported": type(x).__name__}

    def _encode_out(self, out: Any, index: int, renamed: dict[int, int], random: bool, uninit: bool) -> Any:
        if isinstance(out, torch.Tensor):
            vid = renamed.get(id(out))
            return {"t": vid if vid is not None else self._new_value(out, index, keep=random, hashed=not uninit)}
        if isinstance(out, list | tuple):
            return [self._encode_out(v, index, renamed, random, uninit) for v in out]
        return self._encode(out)

    def _vid_in(self, t: torch.Tensor) -> int:
        vid = self.ids.get(t)
        if vid is not None:
            return vid
        source = self.sources.get(t, "const")
        vid = self._new_value(t, -1, keep=not stored_from_snapshot(source))
        self.stream.externals[vid] = source
        return vid

    def _new_value(self, t: torch.Tensor, by: int, *, keep: bool, hashed: bool = True) -> int:
        vid = len(self.stream.values)
        self.ids[t] = vid
        meta: dict[str, Any] = {
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "device": str(t.device),
            "stride": list(t.stride()) if t.layout == torch.strided else None,
            "by": by,
        }
        self.stream.values.append(meta)
        if hashed and t.layout == torch.strided and t.device.type != "meta":
            self._digests.append(digest(t.detach(), self.sample))
            meta["d"] = len(self._digests) - 1
        if keep:
            self.stream.blobs[vid] = t.detach().to("cpu", copy=True)
        return vid

    # -- finishing --------------------------------------------------------------------------------

    def finish(
        self,
        *,
        results: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        world_size: int = 1,
    ) -> OpStream:
        """Read the digests back (one copy per device) and name the step's results and final state."""
        stream = self.stream
        stream.world_size = world_size
        stream.meta = {
            **stream.meta,
            **(meta or {}),
            "capture_s": time.perf_counter() - self._started,
            "threads": torch.get_num_threads(),  # CPU kernels split reductions by thread count
            "torch": torch.__version__,
        }
        for name, value in (results or {}).items():
            if isinstance(value, torch.Tensor):
                vid = self.ids.get(value)
                if vid is not None:
                    stream.results[name] = vid
            elif isinstance(value, int | float):
                stream.results[name] = {"f": float(value).hex()}
        for t, source in list(self.sources.items()):
            vid = self.ids.get(t)
            if vid is not None and source.startswith(("param/", "state/")):
                stream.finals[source] = vid
        for name, obj in self.tracked.items():
            if isinstance(obj, torch.optim.Optimizer):
                for source, tensor in optimizer_state(name, obj):
                    vid = self.ids.get(tensor)
                    if vid is not None:
                        stream.finals[source] = vid
        self._read_digests()
        return stream

    def _read_digests(self) -> None:
        by_device: dict[str, list[int]] = {}
        for i, d in enumerate(self._digests):
            by_device.setdefault(str(d.device), []).append(i)
        words: list[list[int]] = [[] for _ in self._digests]
        for indices in by_device.values():
            lengths = [self._digests[i].numel() for i in indices]
            flat = torch.cat([self._digests[i] for i in indices]).cpu().tolist()
            offset = 0
            for i, n in zip(indices, lengths, strict=True):
                words[i] = flat[offset : offset + n]
                offset += n
        for meta in self.stream.values:
            d = meta.pop("d", None)
            if d is not None:
                meta["hash"], meta["norm"], meta["sample"] = decode_digest(words[d])
        self._digests = []


def active() -> OpRecorder | None:
    """The capture running in this process, if any."""
    return _active


def mark_batch(*tensors: torch.Tensor) -> None:
    """Tell a running capture that ``tensors`` are the step's batch inputs (a no-op otherwise)."""
    recorder = _active
    if recorder is not None:
        recorder.mark_batch(tensors)
