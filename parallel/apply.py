"""Apply a `Plan` with PyTorch's own APIs, on an initialised process group.

- a ``DeviceMesh`` of shape ``(dp, pp)`` whose entries are the plan's ranks;
- this rank's stage: the plan's contiguous layers in a `StageModule` that names them as the
  whole model does (``blocks.3.attn.weight``), so a snapshot of any split restores into another;
- the data-parallel dimension: ``DistributedDataParallel`` over the mesh's ``dp`` group, or FSDP2
  ``fully_shard`` per layer and per stage on the ``dp`` sub-mesh;
- the pipeline dimension: a ``torch.distributed.pipelining.PipelineStage`` with static shapes
  (computed on the meta device, so no metadata travels between ranks) and ``ScheduleGPipe`` or
  ``Schedule1F1B`` over the ``pp`` group; without a pipeline, ``micro_batches`` steps of
  gradient accumulation.

`Placed.step` runs one optimizer step's forward and backward for this rank's replica; the
caller steps its optimizer over `Placed.module`'s parameters. Each replica takes its share of a
`moai_ckpt.GlobalSampler` batch (`Placed.take`), so the data order does not depend on the plan.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moai_ckpt.errors import PlanMismatchError
from moai_ckpt.sampler import GlobalSampler
from parallel.costmodel import Inputs, as_inputs, find_layers
from parallel.plan import Plan, RankRole

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StageModule(nn.Module):
    """A pipeline stage: some of the model's layers, run in order, under their whole-model names.

    Its ``state_dict`` keys are the whole model's (``blocks.3.attn.weight``, or ``3.weight`` for
    an ``nn.Sequential``), so a stage's state names the same parameters whatever the split.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        order: list[nn.Module] = []
        for name, layer in layers:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                child = parent._modules.get(part)
                if child is None:
                    child = nn.Module()  # a container that mirrors the whole model's nesting
                    parent.add_module(part, child)
                parent = child
            parent.add_module(leaf, layer)
            order.append(layer)
        self._layers = tuple(order)  # a tuple: not registered twice
        self.names = tuple(name for name, _ in layers)

    def layers(self) -> tuple[nn.Module, ...]:
        """The stage's layers in the order they run."""
        return self._layers

    def forward(self, *inputs: torch.Tensor) -> Any:
        x: Any = inputs
        for layer in self._layers:
            out = layer(*x)
            x = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return x[0] if len(x) == 1 else x


@dataclass
class Placed:
    """This rank's part of a plan, ready to train.

    Attributes:
        plan: the plan applied.
        role: this rank's data-parallel rank and stage.
        stage_module: the unwrapped `StageModule` of this stage's layers (for ``state_dict``
            and snapshots: its keys are the whole model's parameter names).
        module: what runs (``stage_module`` wrapped by DDP, or itself after ``fully_shard``).
        schedule: the pipeline schedule, or None without a pipeline.
        mesh: the ``(dp, pp)`` device mesh, or None in a single process.
        device: where this stage's layers live.
    """

    plan: Plan
    role: RankRole
    stage_module: StageModule
    module: nn.Module
    loss_fn: LossFn
    device: torch.device
    schedule: Any | None = None
    mesh: Any | None = None
    _dp_group: Any | None = field(default=None, repr=False)

    @property
    def dp_rank(self) -> int:
        return self.role.dp_rank

    @property
    def dp_size(self) -> int:
        return self.plan.dp

    @property
    def stage(self) -> int:
        return self.role.stage

    @property
    def is_first(self) -> bool:
        """This rank feeds the inputs."""
        return self.role.stage == 0

    @property
    def is_last(self) -> bool:
        """This rank computes the loss (and needs the targets)."""
        return self.role.stage == self.plan.pp - 1

    @property
    def local_batch(self) -> int:
        """Samples this replica processes per step."""
        return self.plan.chosen.micro_batches * self.plan.chosen.micro_batch_size

    def parameters(self) -> list[nn.Parameter]:
        """This rank's trainable parameters (what its optimizer steps)."""
        return list(self.module.parameters())

    def replica_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The replica's loss on every rank of the replica (collective over its pipeline ranks).

        `step` returns the loss on the last stage only; a log of the step wants it on every rank:
        the mean over all ranks of this is then the global batch's mean loss.
        """
        if self.plan.pp == 1:
            assert loss is not None
            return loss.detach()
        value = loss.detach().reshape(()).clone() if loss is not None else torch.zeros((), device=self.device)
        value = value.to(device=self.device, dtype=torch.float32)
        last = self.plan.rank_of(self.dp_rank, self.plan.pp - 1)
        assert self.mesh is not None
        dist.broadcast(value, src=last, group=self.mesh.get_group("pp"))
        return value

    def take(self, sampler: GlobalSampler) -> list[int]:
        """This replica's sample indices of the sampler's current global batch, then advance.

        Every rank calls it every step (ranks of one replica get the same indices).

        Raises:
            PlanMismatchError: the sampler's global batch is not the plan's.
        """
        if sampler.global_batch_size != self.plan.global_batch:
            raise PlanMismatchError(
                f"the sampler's global batch is {sampler.global_batch_size}, the plan's {self.plan.global_batch}"
            )
        return sampler.next_batch(self.dp_rank, self.dp_size)

    def step(self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward and backward of this replica's share of one step; gradients end up averaged
        over the global batch (for a ``loss_fn`` that averages over its micro-batch).

        Args:
            inputs: this replica's inputs (first stage only; ``local_batch`` rows).
            targets: this replica's targets (last stage only).

        Returns:
            The mean loss over this replica's micro-batches on the last stage, else None.
        """
        if self.is_first and (inputs is None or inputs.shape[0] != self.local_batch):
            raise PlanMismatchError(f"stage 0 needs inputs of {self.local_batch} rows (dim 0) each step")
        if self.is_last and (targets is None or targets.shape[0] != self.local_batch):
            raise PlanMismatchError(f"the last stage needs targets of {self.local_batch} rows (dim 0) each step")
        if self.schedule is None:
            assert inputs is not None and targets is not None
            return self._accumulate(inputs.to(self.device), targets.to(self.device))
        losses: list[torch.Tensor] = []
        if self.is_first:
            assert inputs is not None
            self.schedule.step(inputs.to(self.device))
        elif self.is_last:
            assert targets is not None
            self.schedule.step(target=targets.to(self.device), losses=losses)
        else:
            self.schedule.step()
        return torch.stack([loss.detach() for loss in losses]).mean() if losses else None

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.plan.chosen.micro_batches
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m), strict=True)):
            sync = i == m - 1 or not isinstance(self.module, nn.parallel.DistributedDataParallel)
            context = self.module.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
            with context:
                loss = self.loss_fn(self.module(x), y)
                (loss / m).backward()
            total += loss.detach()
        return total / m


def _device_for(plan: Plan, role: RankRole, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    declared = plan.devices[role.device].torch_device
    if declared is not None and declared.startswith("cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if declared is None and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _meta_shapes(layers: Sequence[nn.Module], sample: Inputs, stop: int) -> Inputs:
    """The micro-batch's tensors entering layer ``stop``, computed on the meta device."""
    from torch.func import functional_call

    x: Inputs = tuple(torch.empty_like(t, device="meta") for t in sample)
    for layer in layers[:stop]:
        state = {n: torch.empty_like(t, device="meta") for n, t in layer.state_dict(keep_vars=True).items()}
        out = functional_call(layer, state, x)
        x = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    return x


def _examples(
    layers: Sequence[nn.Module], sample: Inputs, start: int, stop: int, device: torch.device
) -> tuple[Inputs, Inputs]:
    """Example tensors of a stage's inputs and outputs for one micro-batch (static stage shapes)."""

    def real(ts: Inputs, grad: bool) -> Inputs:
        # a received activation needs a gradient for the backward send: the stage reads it from here
        return tuple(
            torch.empty(t.shape, dtype=t.dtype, device=device).requires_grad_(grad and t.is_floating_point())
            for t in ts
        )

    return real(_meta_shapes(layers, sample, start), start > 0), real(_meta_shapes(layers, sample, stop), True)


def apply_plan(
    plan: Plan,
    model: nn.Module,
    loss_fn: LossFn,
    sample: torch.Tensor | Sequence[torch.Tensor],
    *,
    layers: Sequence[nn.Module] | None = None,
    device: torch.device | str | None = None,
) -> Placed:
    """Place this rank's part of ``model`` as ``plan`` says (collective: every rank calls it).

    Args:
        plan: a plan whose layer count matches the model's and whose world size is the job's.
        model: the whole model, built identically on every rank (its layers are taken from it;
            layers of other stages are left where they are and can be freed by the caller).
        loss_fn: ``loss_fn(output, target)``, averaging over its micro-batch.
        sample: one micro-batch of inputs (only shapes and dtypes are used; any micro-batch size).
        layers: the layer sequence, as for `parallel.costmodel.find_layers`.
        device: this rank's device (default: ``cuda:LOCAL_RANK`` for a CUDA plan, else CPU).

    Raises:
        PlanMismatchError: the job's world size or the model's layers differ from the plan's.
    """
    named = find_layers(model, layers)
    found = [m for _, m in named]
    if len(found) != plan.num_layers:
        raise PlanMismatchError(f"the plan places {plan.num_layers} layers, the model has {len(found)}")
    if tuple(name for name, _ in named) != plan.layer_names:
        raise PlanMismatchError(
            f"the plan was made for layers named {plan.layer_names[0]}..{plan.layer_names[-1]}, the model's are "
            f"{named[0][0]}..{named[-1][0]}"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world != plan.world_size:
        raise PlanMismatchError(
            f"the plan needs {plan.world_size} ranks ({plan.summary()}), the job has {world}; "
            "start it with the plan's world size"
        )
    role = plan.role(rank)
    stage = plan.stages[role.stage]
    dev = _device_for(plan, role, device)
    module = StageModule(named[stage.start : stage.stop])
    module.to(dev)
    mb = plan.chosen.micro_batch_size
    example = tuple(t[:1].expand(mb, *t.shape[1:]) for t in as_inputs(sample))
    if world == 1:
        return Placed(plan=plan, role=role, stage_module=module, module=module, loss_fn=loss_fn, device=dev)

    from torch.distributed.device_mesh import DeviceMesh

    # shapes first: after fully_shard the layers run FSDP's hooks even on the meta device
    inputs, outputs = _examples(found, example, stage.start, stage.stop, dev) if plan.pp > 1 else ((), ())

    grid = [[plan.rank_of(d, s) for s in range(plan.pp)] for d in range(plan.dp)]
    mesh = DeviceMesh(dev.type, torch.tensor(grid), mesh_dim_names=("dp", "pp"))
    wrapped: nn.Module = module
    if plan.dp > 1 and plan.chosen.data_parallel == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(
            module, process_group=mesh.get_group("dp"), device_ids=[dev.index] if dev.type == "cuda" else None
        )
    elif plan.dp > 1 and plan.chosen.data_parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        reshard = plan.pp == 1  # in a pipeline parameters stay gathered across the micro-batches
        for layer in module.layers():
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh["dp"], reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh["dp"], reshard_after_forward=reshard)
    placed = Placed(plan=plan, role=role, stage_module=module, module=wrapped, loss_fn=loss_fn, device=dev, mesh=mesh)
    if plan.pp == 1:
        return placed

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pipe_stage = PipelineStage(
        wrapped,
        role.stage,
        plan.pp,
        dev,
        input_args=inputs,
        output_args=outputs,
        group=mesh.get_group("pp"),
    )
    kind = Schedule1F1B if plan.chosen.schedule == "1f1b" else ScheduleGPipe
    placed.schedule = kind(pipe_stage, n_microbatches=plan.chosen.micro_batches, loss_fn=loss_fn)
    return placed
