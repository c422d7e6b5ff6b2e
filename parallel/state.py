"""A placed model's state under whole-model names, so a snapshot of one plan restores into another.

A pipeline stage holds some of the model's parameters, and its optimizer numbers their state by
position (``state[0]`` is the stage's first parameter). Both views below name every entry by the
parameter's whole-model name instead (``blocks.3.attn.weight``), and are `moai_ckpt.PartialState`
objects: a snapshot stores the union of every rank's entries, and each rank of a later job reads
the entries its own stage holds, however the layers are split then.

    run.track(model=StageModelState(placed.stage_module), optim=StageOptimizerState(opt, placed.stage_module))

(`moai_ckpt.Run` substitutes them itself for a placed model and its optimizer.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moai_ckpt.capture import PartialState


class StageModelState(PartialState):
    """A stage module's parameters and buffers, one entry per whole-model name."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return dict(self.module.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state, strict=True)

    def holds(self) -> list[str]:
        return list(self.module.state_dict())

    def like(self, entry: str) -> torch.Tensor | None:
        value = self.module.state_dict().get(entry)
        return value if isinstance(value, torch.Tensor) else None


class StageOptimizerState(PartialState):
    """An optimizer's state and hyperparameters, one entry per parameter's whole-model name.

    Each entry is ``{"hparams": {...}, "state": {...}}``: the scalars of the parameter's group
    (learning rate, betas...) and its state (``step``, ``exp_avg``...; empty before the first
    step). Loading rebuilds the optimizer's positional state dict for this rank's parameters.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        self.optimizer = optimizer
        names = {id(p): n for n, p in module.named_parameters()}
        self._names: list[str] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"the optimizer steps a parameter of shape {tuple(p.shape)} that is not in the stage module"
                    )
                self._names.append(names[id(p)])
        self._params = {name: p for name, p in module.named_parameters()}

    def holds(self) -> list[str]:
        return list(self._names)

    def like(self, entry: str) -> torch.Tensor | None:
        return self._params.get(entry)

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        out: dict[str, Any] = {}
        for group in sd["param_groups"]:
            hparams = {k: v for k, v in group.items() if k != "params"}
            for position in group["params"]:
                out[self._names[position]] = {"hparams": hparams, "state": sd["state"].get(position, {})}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        live = self.optimizer.state_dict()
        groups, positional = [], {}
        for group in live["param_groups"]:
            saved = [state[self._names[p]] for p in group["params"] if self._names[p] in state]
            hparams = dict(saved[0]["hparams"]) if saved else {}
            groups.append({**group, **hparams, "params": group["params"]})
            for position in group["params"]:
                entry = state.get(self._names[position])
                if entry is not None and entry["state"]:
                    positional[position] = entry["state"]
        self.optimizer.load_state_dict({"state": positional, "param_groups": groups})
