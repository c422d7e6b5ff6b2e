"""Nominal figures of common accelerators, for planning on devices that are not present.

Every figure is a **nominal** vendor datasheet figure, not a measurement: dense (no sparsity)
bf16 tensor throughput, memory capacity as the datasheet states it (10^9 bytes per GB), peak
memory bandwidth, and the intra-node link bandwidth *per direction* (half of the bidirectional
NVLink / Infinity Fabric / PCIe figure datasheets print). Real kernels reach a fraction of these;
the cost model carries that fraction over from the device a model was profiled on. Devices
present in a job are measured instead (`parallel.inventory.local_devices`).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

GB = 10**9
TB = 10**12


class CatalogEntry(BaseModel):
    """One accelerator type as its datasheet describes it (nominal figures)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(description="the canonical type name, e.g. H100-SXM")
    vendor_name: str = Field(description="the product as the vendor names it")
    aliases: tuple[str, ...] = Field(default=(), description="other names accepted in a declaration")
    memory_bytes: int = Field(gt=0, description="device memory, as the datasheet states it")
    flops: float = Field(gt=0, description="dense bf16 tensor FLOP/s (fp16 or fp32 where noted)")
    memory_bandwidth: float = Field(gt=0, description="peak device memory bandwidth, bytes/s")
    link_bandwidth: float = Field(gt=0, description="intra-node link bandwidth per direction, bytes/s")
    link_latency: float = Field(gt=0, description="per-message latency of a collective step, seconds")
    note: str = Field(default="", description="what the figures are and where they come from")


def _entry(
    type: str,
    vendor_name: str,
    aliases: tuple[str, ...],
    memory_gb: float,
    tflops: float,
    memory_tbs: float,
    link_gbs: float,
    latency_us: float,
    note: str,
) -> CatalogEntry:
    return CatalogEntry(
        type=type,
        vendor_name=vendor_name,
        aliases=aliases,
        memory_bytes=int(memory_gb * GB),
        flops=tflops * TB,
        memory_bandwidth=memory_tbs * TB,
        link_bandwidth=link_gbs * GB,
        link_latency=latency_us * 1e-6,
        note=note,
    )


#: vendor datasheet figures (nominal); link bandwidth is per direction
CATALOG: tuple[CatalogEntry, ...] = (
    _entry("H100-SXM", "NVIDIA H100 SXM5 80GB", ("H100", "H100-SXM5"), 80, 989, 3.35, 450, 10,
           "vendor datasheet figures: 989 TFLOP/s bf16 dense, HBM3 3.35 TB/s, NVLink 900 GB/s bidirectional"),
    _entry("H100-PCIe", "NVIDIA H100 PCIe 80GB", ("H100-PCIE",), 80, 756, 2.0, 64, 15,
           "vendor datasheet figures: 756 TFLOP/s bf16 dense, HBM2e 2.0 TB/s, PCIe Gen5 128 GB/s bidirectional"),
    _entry("H200", "NVIDIA H200 SXM 141GB", ("H200-SXM",), 141, 989, 4.8, 450, 10,
           "vendor datasheet figures: 989 TFLOP/s bf16 dense, HBM3e 4.8 TB/s, NVLink 900 GB/s bidirectional"),
    _entry("A100-80GB", "NVIDIA A100 SXM4 80GB", ("A100", "A100-SXM", "A100-SXM4-80GB"), 80, 312, 2.039, 300, 10,
           "vendor datasheet figures: 312 TFLOP/s bf16 dense, HBM2e 2.0 TB/s, NVLink 600 GB/s bidirectional"),
    _entry("A100-40GB", "NVIDIA A100 SXM4 40GB", ("A100-SXM4-40GB",), 40, 312, 1.555, 300, 10,
           "vendor datasheet figures: 312 TFLOP/s bf16 dense, HBM2 1.6 TB/s, NVLink 600 GB/s bidirectional"),
    _entry("L40S", "NVIDIA L40S", (), 48, 362, 0.864, 32, 15,
           "vendor datasheet figures: 362 TFLOP/s bf16 dense, GDDR6 864 GB/s, PCIe Gen4 x16 64 GB/s bidirectional"),
    _entry("L4", "NVIDIA L4", (), 24, 121, 0.300, 32, 15,
           "vendor datasheet figures: 121 TFLOP/s bf16 dense, GDDR6 300 GB/s, PCIe Gen4 x16 64 GB/s bidirectional"),
    _entry("A10G", "NVIDIA A10G (AWS G5)", (), 24, 70, 0.600, 32, 15,
           "no public NVIDIA datasheet: the tensor throughput commonly published for AWS G5 (the least certain "
           "entry), GDDR6 600 GB/s, PCIe Gen4 x16"),
    _entry("V100", "NVIDIA V100 SXM2 32GB", ("V100-SXM2",), 32, 125, 0.900, 150, 10,
           "vendor datasheet figures: no bf16 on this GPU, 125 TFLOP/s is fp16 tensor; HBM2 900 GB/s, "
           "NVLink 300 GB/s bidirectional"),
    _entry("MI300X", "AMD Instinct MI300X", (), 192, 1307, 5.3, 448, 10,
           "vendor datasheet figures: 1307 TFLOP/s bf16 dense, HBM3 5.3 TB/s, 7 Infinity Fabric links of "
           "128 GB/s bidirectional"),
    _entry("B200", "NVIDIA B200 (HGX)", (), 180, 2250, 8.0, 900, 10,
           "vendor datasheet figures: 2.25 PFLOP/s bf16 dense, HBM3e 8 TB/s, NVLink 1.8 TB/s bidirectional"),
    _entry("CPU", "host CPU (placeholder)", (), 64, 0.5, 0.05, 2, 100,
           "placeholder, not a datasheet: CPUs differ too much for one figure; fp32 throughput; link = gloo "
           "over loopback TCP. Use parallel.inventory.local_devices() to measure the real one"),
)  # fmt: skip

_BY_NAME: dict[str, CatalogEntry] = {}
for _e in CATALOG:
    for _name in (_e.type, *_e.aliases):
        _BY_NAME[_name.upper()] = _e

#: words of ``torch.cuda.get_device_name`` that identify a catalog type, most specific first
_CUDA_NAME_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("H100", "PCIE"), "H100-PCIe"),
    (("H100",), "H100-SXM"),
    (("H200",), "H200"),
    (("A100", "40GB"), "A100-40GB"),
    (("A100",), "A100-80GB"),
    (("L40S",), "L40S"),
    (("L4",), "L4"),
    (("A10G",), "A10G"),
    (("V100",), "V100"),
    (("MI300X",), "MI300X"),
    (("B200",), "B200"),
)


def lookup(name: str) -> CatalogEntry | None:
    """The catalog entry for a type name or alias (case-insensitive), or None."""
    return _BY_NAME.get(name.strip().upper())


def identify(device_name: str) -> CatalogEntry | None:
    """The catalog entry a driver's device name (``NVIDIA H100 80GB HBM3``) refers to, or None."""
    tokens = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for words, type_name in _CUDA_NAME_HINTS:
        if all(w in tokens for w in words):
            return lookup(type_name)
    return None


def known_types() -> list[str]:
    """Every canonical type name, in catalog order."""
    return [e.type for e in CATALOG]
