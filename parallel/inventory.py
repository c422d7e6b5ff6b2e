"""The devices a job has: declared for offline planning, or present and measured.

A `Device` is one rank's accelerator (or CPU share) as the planner sees it: memory, dense
throughput, memory bandwidth, and the link it talks to its peers over. Declared devices
(``parse_devices("2xH100,1xA100")``) take the catalog's nominal figures; present ones
(`local_device`, `job_devices`) are measured by a short matmul probe and a copy-bandwidth probe,
cached per device type in ``$XDG_CACHE_HOME/moai-ckpt/devices.json`` so a restart does not pay
for them again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import socket
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moai_ckpt.errors import DeviceSpecError
from parallel.catalog import CatalogEntry, identify, known_types, lookup

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
#: the most devices a declaration (and so a plan) covers: keeps the planner's search finite
MAX_DEVICES = 4096
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_ITEM = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9_.\-]+?)\s*(?::\s*([\d.]+)\s*([A-Za-z]*)\s*)?$")


class Device(BaseModel):
    """One rank's device as the planner sees it.

    Figures are per device: ``flops`` is dense throughput in the dtype training uses (bf16 on
    accelerators, fp32 on a CPU), ``link_bandwidth`` one direction of the link to its peers.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(min_length=1, description="device type: a catalog type name, or a measured type")
    name: str = Field(description="the product name (datasheet or driver)")
    memory_bytes: int = Field(gt=0, description="memory this rank may use")
    flops: float = Field(gt=0, description="dense FLOP/s")
    memory_bandwidth: float = Field(gt=0, description="device memory bandwidth, bytes/s")
    link_bandwidth: float = Field(gt=0, description="bandwidth to peers per direction, bytes/s")
    link_latency: float = Field(gt=0, description="latency of one collective step, seconds")
    source: Literal["catalog", "measured"] = Field(description="nominal datasheet figures, or measured here")
    host: str | None = Field(default=None, description="the host of a present device")
    torch_device: str | None = Field(default=None, description="'cuda:0' or 'cpu' for a present device")

    @property
    def label(self) -> str:
        """``H100-SXM`` or ``H100-SXM*`` (measured) for tables."""
        return f"{self.type}*" if self.source == "measured" else self.type


def from_catalog(entry: CatalogEntry, memory_bytes: int | None = None) -> Device:
    """A declared device with the catalog's nominal figures (``memory_bytes`` overrides memory)."""
    return Device(
        type=entry.type,
        name=entry.vendor_name,
        memory_bytes=memory_bytes or entry.memory_bytes,
        flops=entry.flops,
        memory_bandwidth=entry.memory_bandwidth,
        link_bandwidth=entry.link_bandwidth,
        link_latency=entry.link_latency,
        source="catalog",
    )


def parse_devices(spec: str) -> list[Device]:
    """Devices declared as ``COUNTxTYPE[:MEMORY]`` items, comma-separated, in rank order.

    ``"2xH100,1xA100"``; ``"4xCPU:2GiB"`` (memory overrides the catalog's); a bare ``"L4"`` is
    one device. Types and aliases are the catalog's, case-insensitive.

    Raises:
        DeviceSpecError: an unknown type, a malformed item or a zero count.
    """
    devices: list[Device] = []
    for item in spec.split(","):
        if not item.strip():
            continue
        match = _ITEM.match(item)
        if match is None:
            raise DeviceSpecError(f"cannot read device item {item.strip()!r}: write COUNTxTYPE[:MEMORY], e.g. 2xH100")
        count_text, type_name, amount, unit = match.groups()
        count = int(count_text) if count_text else 1
        entry = lookup(type_name)
        if entry is None:
            raise DeviceSpecError(
                f"unknown device type {type_name!r} in {spec!r}; known types: {', '.join(known_types())}"
            )
        if count < 1:
            raise DeviceSpecError(f"device item {item.strip()!r} declares no device")
        if len(devices) + count > MAX_DEVICES:
            raise DeviceSpecError(f"{spec!r} declares more than {MAX_DEVICES} devices, the most a plan covers")
        memory = None
        if amount is not None:
            factor = _UNITS.get(unit.upper())
            if factor is None:
                raise DeviceSpecError(f"unknown memory unit {unit!r} in {item.strip()!r}; use GB, GiB, MB, ...")
            try:
                size = float(amount) * factor
            except ValueError:
                raise DeviceSpecError(f"cannot read the memory in {item.strip()!r}") from None
            if not math.isfinite(size) or size <= 0:
                raise DeviceSpecError(f"device item {item.strip()!r} declares no finite memory")
            memory = int(size)
            if memory <= 0:
                raise DeviceSpecError(f"device item {item.strip()!r} declares no memory")
        devices.extend(from_catalog(entry, memory) for _ in range(count))
    if not devices:
        raise DeviceSpecError(f"no device declared in {spec!r}")
    return devices


def describe(devices: list[Device]) -> str:
    """``2xH100-SXM,1xA100-80GB``: a device list in the declaration syntax (runs merged)."""
    parts: list[tuple[str, int]] = []
    for d in devices:
        if parts and parts[-1][0] == d.label:
            parts[-1] = (d.label, parts[-1][1] + 1)
        else:
            parts.append((d.label, 1))
    return ",".join(f"{n}x{label}" for label, n in parts)


# -- measured devices --------------------------------------------------------------------------


class ProbeResult(BaseModel):
    """What the probes measured on one device type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flops: float = Field(gt=0)
    memory_bandwidth: float = Field(gt=0)
    measured: str = Field(description="when (ISO 8601, UTC)")
    torch: str = Field(description="torch version of the measurement")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/moai-ckpt`` (``~/.cache/moai-ckpt`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moai-ckpt"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, budget_s: float, max_reps: int = 50) -> float:
    """Seconds per call of ``fn``: one warm-up, then repetitions until ``budget_s`` is spent."""
    fn()
    _sync(device)
    reps, started = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        _sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s or reps >= max_reps:
            return elapsed / reps


def probe(device: torch.device, budget_s: float = 0.25) -> ProbeResult:
    """Measure dense matmul throughput and copy bandwidth on ``device`` (about 2 x ``budget_s``).

    Accelerators are measured in bf16 with 4096-square matrices and a 512 MiB copy; a CPU in fp32
    with 512-square matrices and a 64 MiB copy, on the threads torch uses now.
    """
    accelerator = device.type != "cpu"
    n, dtype = (4096, torch.bfloat16) if accelerator else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / _timed(lambda: torch.mm(a, b, out=out), device, budget_s)
    nbytes = (512 << 20) if accelerator else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    bandwidth = 2 * nbytes / _timed(lambda: dst.copy_(src), device, budget_s)  # a copy reads and writes each byte
    return ProbeResult(
        flops=flops, memory_bandwidth=bandwidth, measured=datetime.now(UTC).isoformat(), torch=torch.__version__
    )


class ProbeCache:
    """Probe results per device type in one JSON file; unreadable files are ignored, not fatal.

    Several ranks may write the file at once: each write replaces it whole (a rename), so a
    reader sees one writer's version, and a lost entry is measured again next time.
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.path = Path(directory or default_cache_dir()) / "devices.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the device cache %s: %s", self.path, exc)
            return {}
        if (
            not isinstance(data, dict)
            or data.get("format") != CACHE_FORMAT
            or not isinstance(data.get("devices"), dict)
        ):
            return {}
        return data["devices"]

    def get(self, key: str) -> ProbeResult | None:
        entry = self._load().get(key)
        if entry is None:
            return None
        try:
            return ProbeResult.model_validate(entry)
        except ValidationError:
            return None

    def put(self, key: str, result: ProbeResult) -> None:
        devices = self._load() | {key: result.model_dump()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".devices-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"format": CACHE_FORMAT, "devices": devices}, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home must not stop a job: measure again next time
            log.warning("cannot write the device cache %s: %s", self.path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _host_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def local_device(
    device: torch.device | str | None = None,
    *,
    ranks_sharing: int = 1,
    cache_dir: Path | str | None = None,
    refresh: bool = False,
) -> Device:
    """This process's device, measured (once per device type, then from the cache).

    Args:
        device: ``cuda:N`` or ``cpu``; default ``cuda:LOCAL_RANK`` when CUDA is present, else CPU.
        ranks_sharing: ranks on this host that share it (a CPU's cores and memory are divided
            among them; an accelerator is not shared).
        cache_dir: where ``devices.json`` lives (default `default_cache_dir`).
        refresh: measure even if the cache has this device type.
    """
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        name = torch.cuda.get_device_name(dev)
        memory = int(torch.cuda.get_device_properties(dev).total_memory)
        entry = identify(name)
        type_name = entry.type if entry else re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-")
        key = f"cuda|{name}"
    else:
        name, threads = _cpu_name(), torch.get_num_threads()
        memory = _host_memory() // max(1, ranks_sharing)
        entry, type_name = lookup("CPU"), "CPU"
        key = f"cpu|{name}|threads={threads}"
    cache = ProbeCache(cache_dir)
    result = None if refresh else cache.get(key)
    if result is None:
        result = probe(dev)
        cache.put(key, result)
    flops, bandwidth = result.flops, result.memory_bandwidth
    if dev.type == "cpu":
        # ranks on one host divide its cores: a rank gets its threads' share of them
        share = min(1.0, (os.cpu_count() or 1) / max(1, ranks_sharing * torch.get_num_threads()))
        flops, bandwidth = flops * share, bandwidth / max(1, ranks_sharing)
    assert entry is not None or dev.type == "cuda"
    return Device(
        type=type_name,
        name=name,
        memory_bytes=memory,
        flops=flops,
        memory_bandwidth=bandwidth,
        link_bandwidth=entry.link_bandwidth if entry else 25 * 10**9,  # unknown GPU: PCIe-class link
        link_latency=entry.link_latency if entry else 15e-6,
        source="measured",
        host=socket.gethostname(),
        torch_device=str(dev),
    )


class LinkProbe(BaseModel):
    """The job's interconnect as a ring all-reduce sees it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bandwidth: float = Field(gt=0, description="bytes/s per direction")
    latency: float = Field(gt=0, description="seconds per ring step")


def probe_link(
    device: torch.device, group: Any | None = None, nbytes: int | None = None, repeats: int = 5
) -> LinkProbe:
    """Time all-reduces of a tiny and of an ``nbytes`` tensor over ``group`` (collective).

    A ring all-reduce over ``n`` ranks takes ``2 (n-1) latency + 2 (n-1)/n bytes / bandwidth``.
    The big message must take well over the latency, or the difference is noise: 256 MiB on an
    accelerator (4 MiB over NVLink read as petabytes a second), 4 MiB on a CPU.
    """
    import torch.distributed as dist

    if nbytes is None:
        nbytes = (256 << 20) if device.type != "cpu" else (4 << 20)
    n = dist.get_world_size(group)
    small = torch.zeros(1, device=device)
    big = torch.zeros(nbytes // 4, device=device)

    def timed(t: torch.Tensor) -> float:
        dist.all_reduce(t, group=group)  # warm-up: connections, buffers
        _sync(device)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            dist.all_reduce(t, group=group)
            _sync(device)
            samples.append(time.perf_counter() - started)
        return sorted(samples)[len(samples) // 2]

    t_small, t_big = timed(small), timed(big)
    steps = 2 * (n - 1)
    latency = max(t_small / steps, 1e-7)
    bandwidth = steps / n * nbytes / max(t_big - t_small, 1e-9)
    return LinkProbe(bandwidth=bandwidth, latency=latency)


def job_devices(
    device: torch.device | str | None = None,
    *,
    cache_dir: Path | str | None = None,
    timeout_s: float = 300.0,
    measure_link: bool = True,
) -> list[Device]:
    """Every rank's `local_device`, in rank order (collective under torch.distributed).

    Ranks on one host that run on its CPU share its cores and memory; each rank's share is
    counted from the host names the ranks report. One rank per host runs the probes, alone.
    With ``measure_link`` the default process group's all-reduce is timed and its latency and
    bandwidth replace the catalog's link figures (the same for every device of the job).
    """
    import torch.distributed as dist

    from moai_ckpt.distributed import current_world

    world = current_world(timedelta(seconds=timeout_s))
    try:
        hosts = world.all_gather_json(socket.gethostname(), "device inventory: host names")
        me = socket.gethostname()
        # one rank per host probes while its neighbours wait, so they do not slow its probe;
        # the others then find the result in the cache (or, with no writable cache, probe after)
        leader = hosts.index(me) == world.rank
        if leader:
            local_device(device, cache_dir=cache_dir)
        world.barrier("device inventory: probes")
        here = local_device(device, cache_dir=cache_dir)
        if here.torch_device == "cpu" and hosts.count(me) > 1:
            here = local_device(device, ranks_sharing=hosts.count(me), cache_dir=cache_dir)
        gathered = [Device.model_validate(d) for d in world.all_gather_json(here.model_dump(), "device inventory")]
    finally:
        world.close()
    if measure_link and dist.is_initialized() and dist.get_world_size() > 1:
        link = probe_link(torch.device(here.torch_device or "cpu"))
        gathered = [
            d.model_copy(update={"link_bandwidth": link.bandwidth, "link_latency": link.latency}) for d in gathered
        ]
    return gathered
