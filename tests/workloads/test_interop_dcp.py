"""DCP checkpoints to snapshots and back, checked against torch.distributed.checkpoint's own save and load."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from typer.testing import CliRunner

from moai_ckpt import Checkpointer, cli
from moai_ckpt.interop import InteropError, UntrustedDataError, export_dcp, export_safetensors, import_dcp, read_state
from moai_ckpt.testing.dist import launch

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class AppState(Stateful):
    """torch's DCP recipe: a model and its optimizer as one Stateful, FQN-keyed through get_state_dict."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def trained(seed: int, named: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A bf16 model and its AdamW after two steps; another seed gives other values everywhere."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    params = list(model.named_parameters()) if named else model.parameters()
    opt = torch.optim.AdamW(params, lr=1e-2 * (seed + 1), betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(3, 6, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same(expected: Any, actual: Any, path: str = "") -> None:
    """Equal trees: tensors bitwise with the same dtype and shape, everything else by ``==``."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), path
        a, b = expected.detach().contiguous(), actual.detach().contiguous()
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(map(str, actual)) == sorted(map(str, expected)), path
        by_name = {str(k): v for k, v in actual.items()}
        for k, v in expected.items():
            assert_same(v, by_name[str(k)], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for i, (u, v) in enumerate(zip(expected, actual, strict=True)):
            assert_same(u, v, f"{path}.{i}")
    else:
        assert actual == expected, path


def everything(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


# -- DCP -> snapshot ---------------------------------------------------------------------------


def test_dcp_checkpoint_becomes_a_snapshot_that_restores_bitwise(tmp_path: Path) -> None:
    model, opt = trained(0)
    extra = {"tokens": 1234, "betas": (0.9, 0.99), "names": ["a", "b"]}
    source = tmp_path / "dcp" / "step-40"
    dcp.save({"app": AppState(model, opt), "extra": extra}, checkpoint_id=source)
    run = str(tmp_path / "run")

    printed = _cli("import-dcp", str(source), run, "--trust-dcp-metadata")

    assert "as step 40" in printed
    other_model, other_opt = trained(1)
    with Checkpointer(run) as ckpt:
        assert ckpt.steps() == [40]
        assert ckpt.verify(40).ok
        state: dict[str, Any] = {"app": AppState(other_model, other_opt), "extra": {}}
        assert ckpt.restore(state) == 40
    assert_same(everything(model, opt), everything(other_model, other_opt))
    assert_same(extra, state["extra"])


def test_model_entry_restores_into_a_module_and_the_optimizer_reads_back(tmp_path: Path) -> None:
    model, opt = trained(0)
    source = str(tmp_path / "dcp")
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=source
    )
    run = str(tmp_path / "run")

    result = import_dcp(source, run, step=7, trust_metadata=True)

    assert (result.step, result.modules, result.opaque) == (7, ["model"], [])
    other_model, other_opt = trained(1)
    with Checkpointer(run) as ckpt:
        ckpt.restore({"model": other_model})  # a module entry restores into any module with these names
    set_optimizer_state_dict(other_model, other_opt, read_state(run, keys=["optim"])["optim"])
    assert_same(everything(model, opt), everything(other_model, other_opt))


class Evil:
    """Unpickling this creates a file: proof that a crafted .metadata runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_without_the_trust_flag_nothing_is_unpickled(tmp_path: Path) -> None:
    crafted, marker = tmp_path / "crafted", tmp_path / "code-ran"
    crafted.mkdir()
    (crafted / ".metadata").write_bytes(pickle.dumps(Evil(marker)))

    with pytest.raises(UntrustedDataError, match=r"unpickles its \.metadata"):
        import_dcp(str(crafted), str(tmp_path / "run"))
    result = CliRunner().invoke(cli.app, ["import-dcp", str(crafted), str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--trust-dcp-metadata" in result.output and "run code" in result.output
    assert not marker.exists()
    assert not (tmp_path / "run").exists()

    # the risk is real: trusting the directory runs its code (and the import then fails cleanly)
    with pytest.raises(InteropError, match="DCP could not read"):
        import_dcp(str(crafted), str(tmp_path / "run"), trust_metadata=True)
    assert marker.exists()


def test_not_a_dcp_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InteropError, match=r"no \.metadata file"):
        import_dcp(str(tmp_path), str(tmp_path / "run"), trust_metadata=True)
    with pytest.raises(InteropError, match="cannot open the DCP directory"):
        import_dcp("nosuchprotocol://x/step-1", str(tmp_path / "run"), trust_metadata=True)


def test_payloads_the_restricted_loader_refuses_stay_raw_and_go_back_verbatim(tmp_path: Path) -> None:
    weights = torch.randn(4, 3).to(torch.float8_e4m3fn)
    source, back, run = str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "run")
    dcp.save({"extra": {"buffer": io.BytesIO(b"opaque bytes"), "n": 3}, "w": {"t": weights}}, checkpoint_id=source)

    result = import_dcp(source, run, trust_metadata=True)

    assert result.opaque == ["extra.buffer"]
    kept = read_state(run)["extra"]
    assert kept["n"] == 3
    assert isinstance(kept["buffer"], bytes) and kept["buffer"].startswith(b"PK")  # the torch.save archive, unopened
    # written back as they are, DCP's loader would unpickle bytes that whoever wrote the snapshot chose
    with pytest.raises(InteropError, match=r"raw torch.save payloads \(extra.buffer\)") as info:
        export_dcp(run, back)
    assert info.value.key == "extra.buffer"
    assert not Path(back).exists()
    export_dcp(run, str(tmp_path / "without"), keys=["w"])  # leaving the entry out needs no trust
    assert export_dcp(run, back, trust_payloads=True).verbatim == ["extra.buffer"]
    target: dict[str, Any] = {
        "extra": {"buffer": io.BytesIO(), "n": 0},
        "w": {"t": torch.empty(4, 3).to(weights.dtype)},
    }
    dcp.load(target, checkpoint_id=back)
    assert target["extra"]["buffer"].getvalue() == b"opaque bytes"
    assert target["extra"]["n"] == 3
    assert_same(weights, target["w"]["t"])


def test_top_level_tensors_need_a_free_entry_name_and_module_keys_must_be_weights(tmp_path: Path) -> None:
    source, run = str(tmp_path / "dcp"), str(tmp_path / "run")
    dcp.save({"w": torch.ones(2), "model": {"x": torch.zeros(1)}, "extra": {"n": 1}}, checkpoint_id=source)

    with pytest.raises(InteropError, match="also an entry 'model'"):
        import_dcp(source, run, trust_metadata=True)
    with pytest.raises(InteropError, match="entry 'extra' is not a flat state dict of tensors"):
        import_dcp(source, run, trust_metadata=True, top_level_key="loose", module_keys=["extra"])
    assert not Path(run).exists()

    result = import_dcp(source, run, trust_metadata=True, top_level_key="loose", module_keys=["loose", "model"])
    assert (result.top_level_key, result.modules) == ("loose", ["loose", "model"])


def test_dcp_checkpoints_on_fsspec_storage_convert_both_ways() -> None:
    weights = {"w": torch.randn(5, 3).to(torch.bfloat16), "b": torch.arange(3)}
    dcp.save({"model": weights}, checkpoint_id="memory://interop-test/in", no_dist=True)

    import_dcp("memory://interop-test/in", "memory://interop-test/run", step=4, trust_metadata=True)
    export_dcp("memory://interop-test/run", "memory://interop-test/out")

    target = {"model": {"w": torch.empty(5, 3, dtype=torch.bfloat16), "b": torch.empty(3, dtype=torch.int64)}}
    dcp.load(target, checkpoint_id="memory://interop-test/out", no_dist=True)
    assert_same(weights, target["model"])


# -- snapshot -> DCP ---------------------------------------------------------------------------


def test_snapshot_exports_to_dcp_that_torch_loads_bitwise(tmp_path: Path) -> None:
    model, opt = trained(0)
    run, target_dir = str(tmp_path / "run"), str(tmp_path / "dcp")
    extra = {"tokens": 77, "schedule": [0.1, 0.2]}
    with Checkpointer(run) as ckpt:
        ckpt.save(9, {"app": AppState(model, opt), "extra": extra})

    printed = _cli("export-dcp", run, target_dir)

    assert "exported step 9" in printed
    other_model, other_opt = trained(1)
    target: dict[str, Any] = {"app": AppState(other_model, other_opt), "extra": {"tokens": 0, "schedule": [0.0, 0.0]}}
    dcp.load(target, checkpoint_id=target_dir)
    assert_same(everything(model, opt), everything(other_model, other_opt))
    assert_same(extra, target["extra"])


def test_native_module_and_optimizer_entries_load_in_place_with_dcp(tmp_path: Path) -> None:
    model, opt = trained(0)
    run, target_dir = str(tmp_path / "run"), str(tmp_path / "dcp")
    with Checkpointer(run) as ckpt:
        ckpt.save(3, {"model": model, "optim": opt})
    export_dcp(run, target_dir)

    other_model, other_opt = trained(1)  # its optimizer state exists, so DCP has tensors to load into
    target = everything(other_model, other_opt)
    dcp.load(target, checkpoint_id=target_dir)
    other_opt.load_state_dict(target["optim"])
    assert_same(everything(model, opt), everything(other_model, other_opt))


def test_export_refuses_an_existing_checkpoint_unless_overwrite(tmp_path: Path) -> None:
    model = trained(0)[0]
    run, target_dir = str(tmp_path / "run"), tmp_path / "dcp"
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"model": model})
        ckpt.save(2, {"model": trained(1)[0]})
    export_dcp(run, str(target_dir), step=1)
    before = (target_dir / ".metadata").read_bytes()

    with pytest.raises(InteropError, match="already holds a DCP checkpoint"):
        export_dcp(run, str(target_dir))
    assert (target_dir / ".metadata").read_bytes() == before

    export_dcp(run, str(target_dir), overwrite=True)
    target = {"model": trained(3)[0].state_dict()}
    dcp.load(target, checkpoint_id=str(target_dir))
    assert_same(read_state(run, step=2)["model"], target["model"])  # the latest step by default


def test_export_of_a_missing_entry_names_the_entries(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"model": nn.Linear(2, 2)})
    with pytest.raises(InteropError, match=r"no entry 'optim'; it holds \['model'\]"):
        export_dcp(run, str(tmp_path / "dcp"), keys=["optim"])
    assert not (tmp_path / "dcp").exists()


# -- torchtitan's layout -----------------------------------------------------------------------


def flat_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """torchtitan's OptimizersContainer.state_dict(): ``state.{fqn}.{name}`` and ``param_groups.{fqn}.{key}``."""
    sd = opt.state_dict()
    flat: dict[str, Any] = {}
    for group in sd["param_groups"]:
        for pid, fqn in zip(group["params"], group["param_names"], strict=True):
            flat |= {f"state.{fqn}.{k}": v for k, v in sd["state"][pid].items()}
            flat |= {f"param_groups.{fqn}.{k}": v for k, v in group.items() if k not in ("params", "param_names")}
    return flat


def torchtitan_states(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """What torchtitan's CheckpointManager hands to dcp.save: the model's FQNs flattened into the top level."""
    return {
        **model.state_dict(),
        "optimizer": flat_optimizer(opt),
        "lr_scheduler": {"last_epoch": step},
        "dataloader": {"version": 1, "dp_world_size": 1, "dp_rank_0": b'{"position": 640}'},
        "train_state": {"step": step, "ntokens_seen": step * 4096},
    }


def test_torchtitan_checkpoint_round_trips_through_a_snapshot(tmp_path: Path) -> None:
    model, opt = trained(0, named=True)
    states = torchtitan_states(model, opt, 10)
    source = tmp_path / "outputs" / "checkpoint" / "step-10"
    dcp.save(states, checkpoint_id=source)
    run = str(tmp_path / "run")

    _cli("import-dcp", str(source), run, "--trust-dcp-metadata")

    with Checkpointer(run) as ckpt:
        assert ckpt.steps() == [10]
        assert sorted(ckpt.manifest(10).objects) == ["dataloader", "lr_scheduler", "model", "optimizer", "train_state"]
        fresh = trained(1, named=True)[0]
        ckpt.restore({"model": fresh})
    assert_same(model.state_dict(), fresh.state_dict())
    export_safetensors(run, tmp_path / "hf")
    assert_same(model.state_dict(), load_file(tmp_path / "hf" / "model.safetensors"))

    resumed = tmp_path / "resumed" / "checkpoint" / "step-10"
    _cli("export-dcp", run, str(resumed))

    # load as torchtitan's CheckpointManager.dcp_load does: its flattened states, filled in place
    other_model, other_opt = trained(1, named=True)
    to_load = torchtitan_states(other_model, other_opt, 0)
    dcp.load(to_load, checkpoint_id=resumed)
    assert_same(states, to_load)
    assert_same(model.state_dict(), other_model.state_dict())


# -- a checkpoint sharded over ranks -----------------------------------------------------------


def test_dcp_checkpoint_saved_by_two_fsdp_ranks_imports_whole(tmp_path: Path) -> None:
    source, expected = str(tmp_path / "dcp"), str(tmp_path / "expected.safetensors")
    results = launch("tests.scenarios.interop_scenarios:save_sharded_dcp", 2, dcp_dir=source, expected=expected)
    assert all(r.returncode == 0 for r in results), "\n".join(r.output for r in results)
    run = str(tmp_path / "run")

    import_dcp(source, run, trust_metadata=True)

    state = read_state(run)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for fqn, values in state["optim"]["state"].items():
        flat |= {f"optim.state.{fqn}.{k}": v for k, v in values.items()}
    flat["extra.table"] = state["extra"]["table"]
    assert_same(load_file(expected), flat)
    assert state["extra"]["step"] == 2
