"""Per-rank programs for the interop tests (run by moai_ckpt.testing.dist.launch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor


def save_sharded_dcp(dcp_dir: str, expected: str) -> dict[str, Any]:
    """Train an FSDP2 model on every rank and save it with DCP, each rank writing its shards.

    Rank 0 also writes every tensor gathered whole by torch itself (``full_state_dict``) to the
    safetensors file ``expected``: what an import of the checkpoint must hold, bit for bit.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7))  # 10 and 7 rows split unevenly
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mesh = init_device_mesh("cpu", (world,))
    table = torch.randn(9, 3, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    model_sd, optim_sd = get_state_dict(model, opt)
    extra = {"table": distribute_tensor(table, mesh, [Shard(0)]), "step": 2}
    dcp.save({"model": model_sd, "optim": optim_sd, "extra": extra}, checkpoint_id=dcp_dir)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    whole_model, whole_optim = get_state_dict(model, opt, options=full)
    if rank == 0:
        flat = {f"model.{k}": v for k, v in whole_model.items()}
        for fqn, state in whole_optim["state"].items():
            flat |= {f"optim.state.{fqn}.{k}": v for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in flat.items()} | {"extra.table": table}, expected)
    dist.barrier()
    return {"rank": rank}
