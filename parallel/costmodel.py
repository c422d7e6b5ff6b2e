"""A per-layer cost profile of a model: time and memory of each layer, per micro-batch.

The model exposes its layer sequence (the modules it runs in order, each taking the previous
one's output): ``layers=`` given explicitly, the model itself when it is an ``nn.Sequential``, or
its single ``nn.ModuleList`` / ``nn.Sequential`` child. `profile_model` runs each layer alone on a
sample micro-batch and records:

- forward and backward time, at the sample's micro-batch size and at half of it, fitted as
  ``fixed + per_sample * b`` so the planner can price any micro-batch size;
- parameter, gradient and optimizer-state bytes (AdamW: two fp32 moments per parameter by
  default), activation bytes kept for backward (saved-tensor hooks, parameters excluded) and
  output bytes (what a pipeline stage boundary sends), per sample;
- forward and backward FLOPs (``torch.utils.flop_counter``), per sample.

On another device type the measured times are carried over by a roofline ratio: a layer's time
scales with ``max(FLOPs / throughput, bytes moved / bandwidth)`` from the profiled device to the
other one. `analytic_profile` builds the same profile without timing anything (the layers run on
the meta device), for models too large for this machine; its times are that roofline divided by
an efficiency. Profiles are JSON, cached in the run directory under ``plans/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moai_ckpt.errors import CorruptSnapshotError, ProfileError
from moai_ckpt.layout import PLANS, is_profile_key, profile_key
from moai_ckpt.storage import Storage, open_storage
from parallel.inventory import Device, local_device, parse_devices

log = logging.getLogger(__name__)

PROFILE_FORMAT = 1

Inputs = tuple[torch.Tensor, ...]


class ProfileOptions(BaseModel):
    """How a profile is measured and what the training job keeps per parameter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    optimizer_bytes_per_param: float = Field(
        default=8.0, ge=0, description="optimizer state per parameter (AdamW: two fp32 moments = 8)"
    )
    grad_bytes_per_param: float | None = Field(
        default=None, ge=0, description="gradient bytes per parameter (default: the parameter's element size)"
    )
    repeats: int = Field(default=5, ge=1, le=100, description="timed repetitions per layer (the median is kept)")
    warmup: int = Field(default=2, ge=0, le=100, description="untimed repetitions before timing")
    analytic_efficiency: float = Field(
        default=0.5, gt=0, le=1, description="fraction of the roofline an analytic profile assumes kernels reach"
    )


class LayerProfile(BaseModel):
    """One layer's costs. Per-sample figures scale linearly with the micro-batch size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: str = Field(description="the layer's class name")
    params: int = Field(ge=0)
    param_bytes: int = Field(ge=0)
    grad_bytes: int = Field(ge=0)
    optimizer_bytes: int = Field(ge=0)
    activation_bytes: float = Field(ge=0, description="bytes kept for backward, per sample")
    output_bytes: float = Field(ge=0, description="bytes of the layer's output, per sample")
    input_bytes: float = Field(ge=0, description="bytes of the layer's input, per sample")
    forward_flops: float = Field(ge=0, description="per sample")
    backward_flops: float = Field(ge=0, description="per sample")
    forward_s: tuple[float, float] | None = Field(
        default=None, description="measured forward seconds: (fixed, per sample); None in an analytic profile"
    )
    backward_s: tuple[float, float] | None = Field(default=None, description="measured backward seconds, likewise")

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def traffic(self, micro_batch: int) -> float:
        """Bytes a forward pass moves through device memory (backward: about twice as many)."""
        return self.param_bytes + micro_batch * (self.input_bytes + self.output_bytes + self.activation_bytes)


class ModelProfile(BaseModel):
    """A model's layers with their costs, measured on one device type (or analytic)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = PROFILE_FORMAT
    model_hash: str = Field(description="digest of the layer structure and the sample's shapes")
    source: Literal["measured", "analytic"]
    device: Device = Field(description="the device measured on (an analytic profile: the one it was built for)")
    micro_batch: int = Field(gt=0, description="the sample micro-batch size")
    layers: tuple[LayerProfile, ...] = Field(min_length=1)
    options: ProfileOptions = Field(default_factory=ProfileOptions)
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def key(self) -> str:
        """Its storage key: ``plans/profile-<device type>-<model hash>[-analytic].json``."""
        return profile_key(self.device.type, self.model_hash, analytic=self.source == "analytic")

    def layer_times(self, device: Device, micro_batch: int) -> list[tuple[float, float]]:
        """(forward, backward) seconds of each layer for one micro-batch on ``device``."""
        return [self._time(layer, device, micro_batch) for layer in self.layers]

    def _time(self, layer: LayerProfile, device: Device, b: int) -> tuple[float, float]:
        f_flops, b_flops = layer.forward_flops * b, layer.backward_flops * b
        f_bytes = layer.traffic(b)
        target = (_roofline(device, f_flops, f_bytes), _roofline(device, b_flops, 2 * f_bytes))
        if layer.forward_s is None or layer.backward_s is None:
            eff = self.options.analytic_efficiency
            return target[0] / eff, target[1] / eff
        measured = (layer.forward_s[0] + layer.forward_s[1] * b, layer.backward_s[0] + layer.backward_s[1] * b)
        here = (_roofline(self.device, f_flops, f_bytes), _roofline(self.device, b_flops, 2 * f_bytes))
        fallback = self.device.flops / device.flops
        forward, backward = (m * (t / h if h > 0 else fallback) for m, t, h in zip(measured, target, here, strict=True))
        return forward, backward


def _roofline(device: Device, flops: float, nbytes: float) -> float:
    return max(flops / device.flops, nbytes / device.memory_bandwidth)


# -- the layer sequence ---------------------------------------------------------------------------


def find_layers(model: nn.Module, layers: Sequence[nn.Module] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's layers in order, with their qualified names.

    Raises:
        ProfileError: no single ``nn.ModuleList`` / ``nn.Sequential`` child holds every parameter
            (pass ``layers=`` explicitly), or a given layer is not part of the model.
    """
    names = {id(m): name for name, m in model.named_modules()}
    if layers is not None:
        found = []
        for i, layer in enumerate(layers):
            if id(layer) not in names and layer is not model:
                raise ProfileError(f"layers[{i}] ({type(layer).__name__}) is not a submodule of the model")
            found.append((names.get(id(layer)) or f"layers.{i}", layer))
    elif isinstance(model, nn.Sequential):
        found = list(model.named_children())
    else:
        holders = [(n, c) for n, c in model.named_children() if isinstance(c, (nn.ModuleList, nn.Sequential))]
        if len(holders) != 1:
            raise ProfileError(
                f"{type(model).__name__} has {len(holders)} nn.ModuleList / nn.Sequential children; "
                "pass layers=[...] (the modules the model runs in order)"
            )
        prefix, holder = holders[0]
        found = [(f"{prefix}.{n}", c) for n, c in holder.named_children()]
    if not found:
        raise ProfileError(f"{type(model).__name__} has no layers to place")
    covered = {id(p) for _, layer in found for p in layer.parameters()}
    outside = [n for n, p in model.named_parameters() if id(p) not in covered]
    if outside:
        raise ProfileError(
            f"parameters outside the layer sequence: {', '.join(outside[:5])}"
            f"{' ...' if len(outside) > 5 else ''}; every parameter must belong to a layer: pass layers=[...] "
            "listing every module the model runs, in order"
        )
    return found


def as_inputs(sample: torch.Tensor | Sequence[torch.Tensor]) -> Inputs:
    """A sample micro-batch as a tuple of tensors (batch along dimension 0)."""
    inputs = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        raise ProfileError("the sample micro-batch must be a tensor or a tuple of tensors with a batch dimension")
    sizes = {t.shape[0] for t in inputs}
    if len(sizes) != 1:
        raise ProfileError(f"the sample's tensors disagree on the batch size (dimension 0): {sorted(sizes)}")
    return inputs


def model_hash(layers: list[tuple[str, nn.Module]], inputs: Inputs, options: ProfileOptions) -> str:
    """A digest of what a profile depends on: layer classes, parameter shapes, sample shapes."""
    parts: list[Any] = [
        [name, type(layer).__name__, [(n, list(p.shape), str(p.dtype)) for n, p in layer.named_parameters()]]
        for name, layer in layers
    ]
    parts.append([(list(t.shape[1:]), str(t.dtype)) for t in inputs])
    parts.append(options.optimizer_bytes_per_param)
    parts.append(options.grad_bytes_per_param)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# -- measuring -----------------------------------------------------------------------------------


def _outputs(value: Any, name: str) -> Inputs:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise ProfileError(f"layer {name} returns {type(value).__name__}; a layer must return a tensor or tensors")


def _detach(inputs: Inputs) -> Inputs:
    return tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t.detach() for t in inputs)


def _storage_id(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    # the storage implementation's address identifies a storage on every device, meta included
    return int(getattr(storage, "_cdata", 0) or storage.data_ptr())


class _Saved:
    """Saved-tensor hooks that add up the bytes autograd keeps, once per storage, skipping parameters."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        sid = _storage_id(t)
        if sid not in self.exclude and sid not in self.seen:
            self.seen.add(sid)
            self.bytes += t.untyped_storage().nbytes()
        return t


class _LayerRun(BaseModel):
    """What one pass over one layer measured at one micro-batch size."""

    forward_s: float
    backward_s: float
    forward_flops: float
    backward_flops: float
    activation_bytes: int
    output_bytes: int
    input_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(
    fn: Callable[[], Callable[[], None] | None], device: torch.device, repeats: int, warmup: int, timed: bool
) -> float:
    """Median seconds of ``fn``; when ``fn`` returns a callable, that callable is what is timed
    (``fn`` itself is the untimed preparation, e.g. a forward pass before a timed backward)."""
    if not timed:
        return 0.0
    samples = []
    for i in range(warmup + repeats):
        _sync(device)
        started = time.perf_counter()
        then = fn()
        if then is not None:
            _sync(device)
            started = time.perf_counter()
            then()
        _sync(device)
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _run_layer(
    name: str, layer: nn.Module, inputs: Inputs, options: ProfileOptions, timed: bool
) -> tuple[_LayerRun, Inputs]:
    device = inputs[0].device
    x = _detach(inputs)
    params = list(layer.parameters())
    grads_before = [p.grad for p in params]
    saved = _Saved({_storage_id(p) for p in params})
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), FlopCounterMode(display=False) as fc:
        out = _outputs(layer(*x), name)
    forward_flops = fc.get_total_flops()
    differentiable = [o for o in out if o.requires_grad]
    grads = [torch.ones_like(o) for o in differentiable]
    with FlopCounterMode(display=False) as fc:
        if differentiable:
            torch.autograd.backward(differentiable, grads)
    backward_flops = fc.get_total_flops()

    def forward() -> None:
        layer(*x)

    def backward() -> Callable[[], None] | None:
        outs = [o for o in _outputs(layer(*x), name) if o.requires_grad]
        return (lambda: torch.autograd.backward(outs, grads)) if outs else None

    forward_s = _median_time(forward, device, options.repeats, options.warmup, timed)
    backward_s = _median_time(backward, device, options.repeats, options.warmup, timed) if differentiable else 0.0
    for p, g in zip(params, grads_before, strict=True):
        p.grad = g
    run = _LayerRun(
        forward_s=forward_s,
        backward_s=backward_s,
        forward_flops=forward_flops,
        backward_flops=backward_flops,
        activation_bytes=saved.bytes,
        output_bytes=sum(o.nbytes for o in out),
        input_bytes=sum(t.nbytes for t in inputs),
    )
    return run, tuple(o.detach() for o in out)


def _run_chain(
    layers: list[tuple[str, nn.Module]], inputs: Inputs, options: ProfileOptions, timed: bool
) -> list[_LayerRun]:
    runs = []
    for name, layer in layers:
        run, inputs = _run_layer(name, layer, inputs, options, timed)
        runs.append(run)
    return runs


def _fit(t_big: float, t_small: float, big: int, small: int) -> tuple[float, float]:
    """(fixed, per sample) through two timings; noise that makes it decrease means no slope."""
    if big == small:
        return 0.0, t_big / big
    per_sample = max((t_big - t_small) / (big - small), 0.0)
    return max(t_big - per_sample * big, 0.0), per_sample


def _layer_profile(name: str, layer: nn.Module, run: Any, batch: int, options: Any, **times: Any) -> LayerProfile:
    """One layer's profile from a run of it on ``batch`` samples (sizes and FLOPs per sample)."""
    count, pbytes, gbytes, obytes = _param_bytes(layer, options)
    return LayerProfile(
        name=name,
        kind=type(layer).__name__,
        params=count,
        param_bytes=pbytes,
        grad_bytes=gbytes,
        optimizer_bytes=obytes,
        activation_bytes=run.activation_bytes / batch,
        output_bytes=run.output_bytes / batch,
        input_bytes=run.input_bytes / batch,
        forward_flops=run.forward_flops / batch,
        backward_flops=run.backward_flops / batch,
        **times,
    )


def _param_bytes(layer: nn.Module, options: ProfileOptions) -> tuple[int, int, int, int]:
    params = list(layer.parameters())
    count = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    grad_per = options.grad_bytes_per_param
    grads = sum(int(p.numel() * (grad_per if grad_per is not None else p.element_size())) for p in trainable)
    optim = int(sum(p.numel() for p in trainable) * options.optimizer_bytes_per_param)
    return count, sum(p.numel() * p.element_size() for p in params), grads, optim


def _check_chain(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Inputs) -> None:
    """Refuse a layer list the model does not run in order (when its output is a comparable tensor)."""
    if isinstance(model, nn.Sequential) and len(layers) == len(model):
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout would make the two runs differ
    try:
        with torch.no_grad():
            try:
                expected = model(*inputs)
            except Exception as exc:  # noqa: BLE001 - any failure just means the check cannot run
                log.debug("cannot compare the model with its layers: %s", exc)
                return
            x: Any = inputs
            for name, layer in layers:
                x = _outputs(layer(*x), name)
    finally:
        for m, mode in modes:
            m.train(mode)
    got: torch.Tensor | None = x[0] if len(x) == 1 else None
    if not isinstance(expected, torch.Tensor) or got is None or got.shape != expected.shape:
        return
    if not torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5):
        raise ProfileError(
            f"{type(model).__name__}'s output differs from running its {len(layers)} layers in order; "
            "pass layers=[...] listing every module the model runs, in order"
        )


def profile_model(
    model: nn.Module,
    sample: torch.Tensor | Sequence[torch.Tensor],
    *,
    layers: Sequence[nn.Module] | None = None,
    options: ProfileOptions | None = None,
    device: Device | None = None,
) -> ModelProfile:
    """Measure every layer of ``model`` on the sample micro-batch, on the sample's device.

    Args:
        model: the model; its layers (see `find_layers`) must chain: each takes the previous
            one's output, the first takes the sample.
        sample: one micro-batch of inputs (a tensor or tuple of tensors, batch along dim 0),
            on the device to measure.
        layers: the layer sequence, if the model does not expose it as described above.
        options: repetitions, optimizer bytes per parameter.
        device: the measured `Device` (default: `local_device` of the sample's device).

    Returns:
        A measured `ModelProfile`. Parameters' ``.grad`` are left as they were.

    Raises:
        ProfileError: no layer sequence, layers that do not chain, or a layer output that is not
            a tensor.
    """
    options = options or ProfileOptions()
    inputs = as_inputs(sample)
    found = find_layers(model, layers)
    _check_chain(model, found, inputs)
    device = device or local_device(inputs[0].device)
    big = inputs[0].shape[0]
    small = max(1, big // 2)
    _run_chain(found, inputs, options.model_copy(update={"repeats": 1, "warmup": 0}), timed=False)  # warm-up
    runs = _run_chain(found, inputs, options, timed=True)
    small_runs = runs if small == big else _run_chain(found, tuple(t[:small] for t in inputs), options, timed=True)
    profiles = []
    for (name, layer), run, low in zip(found, runs, small_runs, strict=True):
        profiles.append(
            _layer_profile(
                name,
                layer,
                run,
                big,
                options,
                forward_s=_fit(run.forward_s, low.forward_s, big, small),
                backward_s=_fit(run.backward_s, low.backward_s, big, small),
            )
        )
    return ModelProfile(
        model_hash=model_hash(found, inputs, options),
        source="measured",
        device=device,
        micro_batch=big,
        layers=tuple(profiles),
        options=options,
    )


def analytic_profile(
    model: nn.Module,
    sample: torch.Tensor | Sequence[torch.Tensor],
    *,
    layers: Sequence[nn.Module] | None = None,
    options: ProfileOptions | None = None,
    device: Device | None = None,
) -> ModelProfile:
    """A profile computed without timing: FLOPs, bytes and shapes from a run on the meta device.

    Works for models that do not fit this machine: build the model and the sample on the meta
    device (``with torch.device("meta"): model = build()``), or pass real ones (each layer is
    copied to the meta device, one at a time). Times are the roofline on the target device
    divided by ``options.analytic_efficiency``.
    """
    options = options or ProfileOptions()
    inputs = tuple(torch.empty_like(t, device="meta") for t in as_inputs(sample))
    found = find_layers(model, layers)
    profiles = []
    x = inputs
    for name, layer in found:
        meta = layer if all(p.device.type == "meta" for p in layer.parameters()) else copy.deepcopy(layer).to("meta")
        run, x = _run_layer(name, meta, x, options, timed=False)
        profiles.append(_layer_profile(name, layer, run, inputs[0].shape[0], options))
    return ModelProfile(
        model_hash=model_hash(found, inputs, options),
        source="analytic",
        device=device or parse_devices("CPU")[0],  # not used by an analytic profile's times
        micro_batch=inputs[0].shape[0],
        layers=tuple(profiles),
        options=options,
    )


# -- the cache in the run directory ------------------------------------------------------------


def _storage(where: str | Storage) -> Storage:
    return where if isinstance(where, Storage) else open_storage(where)


def save_profile(where: str | Storage, profile: ModelProfile) -> str:
    """Write ``profile`` under ``plans/`` in a run directory (URL or `Storage`); returns its key."""
    storage = _storage(where)
    storage.write(profile.key, profile.model_dump_json(indent=2).encode())
    return profile.key


def load_profile(where: str | Storage, key: str) -> ModelProfile:
    """Read one cached profile by key.

    Raises:
        CorruptSnapshotError: the object is not a valid profile.
    """
    storage = _storage(where)
    try:
        return ModelProfile.model_validate_json(storage.read_record(key))
    except ValidationError as exc:
        raise CorruptSnapshotError(f"not a valid model profile: {exc}", url=storage.url, key=key) from exc


def cached_profiles(where: str | Storage) -> list[str]:
    """Keys of every profile cached in a run directory, newest name last."""
    storage = _storage(where)
    return [k for k in storage.list(PLANS) if is_profile_key(k)]


def cached_or_measured(
    where: str | Storage,
    model: nn.Module,
    sample: torch.Tensor | Sequence[torch.Tensor],
    *,
    layers: Sequence[nn.Module] | None = None,
    options: ProfileOptions | None = None,
    device: Device | None = None,
) -> ModelProfile:
    """The run directory's profile of this model on this device type, measured and cached if absent."""
    options = options or ProfileOptions()
    inputs = as_inputs(sample)
    found = find_layers(model, layers)
    device = device or local_device(inputs[0].device)
    storage = _storage(where)
    key = profile_key(device.type, model_hash(found, inputs, options))
    if storage.exists(key):
        try:
            return load_profile(storage, key)
        except CorruptSnapshotError as exc:
            log.warning("measuring again: %s", exc)
    profile = profile_model(model, inputs, layers=[m for _, m in found], options=options, device=device)
    save_profile(storage, profile)
    return profile


def total_bytes(profile: ModelProfile) -> int:
    """Parameters, gradients and optimizer state of the whole model."""
    return sum(layer.state_bytes for layer in profile.layers)


def human(nbytes: float) -> str:
    """``1.5 GiB``: bytes for tables and messages."""
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    exponent = min(int(math.log(nbytes, 1024)), 5)
    return f"{nbytes / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB')[exponent]}"
