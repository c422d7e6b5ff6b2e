"""Snapshots to and from other formats: safetensors for Hugging Face, DCP for torch.distributed.checkpoint.

The conversions read snapshots with the library's checked reader and write them with its
`Checkpointer`; DCP and safetensors are read and written by their own libraries. Importing this
package loads neither: each conversion imports what it needs when it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moai_ckpt.errors import InteropError, UntrustedDataError
from moai_ckpt.interop.state import read_state

if TYPE_CHECKING:
    from moai_ckpt.interop.dcp import DcpExport, DcpImport, export_dcp, import_dcp
    from moai_ckpt.interop.safetensors import SafetensorsExport, export_safetensors

_LAZY = {
    "DcpExport": "moai_ckpt.interop.dcp",
    "DcpImport": "moai_ckpt.interop.dcp",
    "export_dcp": "moai_ckpt.interop.dcp",
    "import_dcp": "moai_ckpt.interop.dcp",
    "SafetensorsExport": "moai_ckpt.interop.safetensors",
    "export_safetensors": "moai_ckpt.interop.safetensors",
}


def __getattr__(name: str) -> Any:
    # torch.distributed.checkpoint and safetensors load only when a conversion is used
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moai_ckpt.interop' has no attribute {name!r}")


__all__ = [
    "DcpExport",
    "DcpImport",
    "InteropError",
    "SafetensorsExport",
    "UntrustedDataError",
    "export_dcp",
    "export_safetensors",
    "import_dcp",
    "read_state",
]
